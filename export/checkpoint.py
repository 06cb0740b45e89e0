"""Official DVIS-DAQ checkpoints: read them, load them strictly, write seeded random ones.

File formats (detectron2 ``DetectionCheckpointer._load_file`` + fvcore ``Checkpointer``):

* ``.pth`` (``torch.save``): ``{"model": state_dict, ...}`` (training checkpoints add
  ``optimizer``/``scheduler``/``iteration``, ignored here) or a bare state dict.
* ``.pkl`` (``pickle``, latin1): detectron2 model-zoo ``{"model": {name: ndarray},
  "__author__": ..., ["matching_heuristics": True]}``, or Caffe2/Detectron1 files
  (``{"blobs": {...}}`` or a bare ``{name: ndarray}``; ``*_momentum`` entries dropped).
  detectron2 renames keys by heuristics when ``matching_heuristics`` is set; we do not: the
  strict name check then reports the mismatch.

Safety: ``.pth`` files are read with ``torch.load(weights_only=True)`` (numpy arrays allowed)
and ``.pkl`` files with an unpickler that only rebuilds numpy arrays and plain containers, so a
checkpoint cannot run code. Files that need more (pickled custom objects) are refused unless
``allow_unsafe_pickle=True`` -- only for files you trust.

Loading differs from the official (lenient) loader on purpose: it is strict by default, and
the only keys tolerated on either side are ``daq_criterion.empty_weight`` (training-only loss
weight saved by the official model) and ``pixel_mean``/``pixel_std`` (non-persistent buffers,
present only in old checkpoints). Like fvcore, a ``module.`` prefix on every key
(DataParallel) is stripped.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from dvis_trt.errors import CheckpointError, InputError

__all__ = [
    "IGNORED_KEYS",
    "LoadReport",
    "load_state_dict_file",
    "load_checkpoint",
    "write_random_checkpoint",
    "official_empty_weight",
]

#: State-dict entries accepted and skipped when the model does not have them (either side).
IGNORED_KEYS = ("daq_criterion.empty_weight", "pixel_mean", "pixel_std")
_EMPTY_WEIGHT_KEY = "daq_criterion.empty_weight"
_SHOW = 5  # keys listed per category in an error message

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    """The informative line of an exception message (torch puts it after boilerplate)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln]
    pick = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")),
                lines[0] if lines else "")
    if len(pick) > 200:
        pick = pick[:197] + "..."
    return f"{type(err).__name__}: {pick}" if pick else type(err).__name__


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 ``.pkl`` weights: numpy arrays and plain containers only."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol >= 5
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),  # protocol-2 pickles store array bytes via codecs.encode
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias old files use
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _numpy_safe_globals() -> List[Any]:
    """numpy objects ``torch.load(weights_only=True)`` may rebuild (arrays saved in a .pth)."""
    out: List[Any] = [np.ndarray, np.dtype]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["_reconstruct"])
            out += [mod._reconstruct, mod.scalar]
            break
        except (ImportError, AttributeError):
            continue
    try:
        import numpy.dtypes as npd
        out += [getattr(npd, n) for n in dir(npd) if n.endswith("DType")]
    except ImportError:  # numpy < 1.25
        pass
    return out


def _torch_load(path: str, allow_unsafe_pickle: bool) -> Any:
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with (allow(_numpy_safe_globals()) if allow else contextlib.nullcontext()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch words every weights_only failure alike; only a refused global means "objects"
        if "Unsupported global" not in str(err) and "GLOBAL" not in str(err):
            raise
        if not allow_unsafe_pickle:
            found = re.search(r"GLOBAL (\S+)", str(err))
            detail = f" (e.g. {found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {path} holds Python objects beyond tensors and arrays{detail}; "
                "re-save it as {'model': state_dict}, "
                "or load it with allow_unsafe_pickle=True only if you trust the file") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _pickle_load(path: str, allow_unsafe_pickle: bool) -> Any:
    with open(path, "rb") as f:
        if allow_unsafe_pickle:
            return pickle.load(f, encoding="latin1")
        try:
            return _ArrayUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            if "refusing to unpickle" in str(err):
                raise CheckpointError(
                    f"checkpoint {path} holds Python objects beyond numpy arrays ({err}); "
                    "load it with allow_unsafe_pickle=True only if you trust the file") from None
            raise


def _to_tensor(key: str, value: Any, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value))  # copy: contiguous, writable, owned
    raise CheckpointError(f"checkpoint {path}: entry {key!r} is a {type(value).__name__}, not a "
                          "tensor or array; is this a model state dict?")


def load_state_dict_file(path: PathLike, *, allow_unsafe_pickle: bool = False
                         ) -> "OrderedDict[str, torch.Tensor]":
    """Read the model weights of an official checkpoint file.

    Args:
        path: ``.pth`` (torch) or ``.pkl`` (detectron2 pickle) file; a ``.pkl`` that is really a
            torch zip archive is read as ``.pth``.
        allow_unsafe_pickle: also accept files that pickle arbitrary Python objects (this can
            run code from the file; only for trusted files).

    Returns:
        ``OrderedDict`` name -> CPU tensor (dtype as stored, usually float32), in file order;
        numpy arrays converted; a ``module.`` prefix common to all keys removed.

    Raises:
        InputError: ``path`` does not exist or is a directory.
        CheckpointError: unreadable, truncated or corrupt file, no state dict inside, a non-array
            entry, or (without ``allow_unsafe_pickle``) pickled objects beyond tensors/arrays.

    Semantics follow detectron2 ``DetectionCheckpointer._load_file`` and fvcore
    ``Checkpointer._load_model`` (ndarray conversion, ``module.`` stripping).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"checkpoint {path} not found; pass the path of a .pth or .pkl file")
    if os.path.isdir(path):
        raise InputError(f"checkpoint {path} is a directory; pass the path of a .pth or .pkl file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); re-download or re-export it")
    with open(path, "rb") as f:
        magic = f.read(4)
    is_pickle = path.endswith(".pkl") and magic != b"PK\x03\x04"
    try:
        obj = _pickle_load(path, allow_unsafe_pickle) if is_pickle \
            else _torch_load(path, allow_unsafe_pickle)
    except CheckpointError:
        raise
    except Exception as err:  # torch/pickle raise many types for damaged files
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK") or head[:1] == b"\x80"):
            # neither a zip (torch >= 1.6) nor a pickle stream: torch's weights_only wording
            # would only mislead
            raise CheckpointError(f"{path} is not a PyTorch (.pth) or detectron2 (.pkl) "
                                  "checkpoint (it is neither a zip archive nor a pickle)") from None
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): "
                              f"{_one_line(err)}") from None

    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict "
                              "or {'model': state_dict}")
    if "model" in obj:
        state = obj["model"]
    elif is_pickle and "blobs" in obj:  # Caffe2 / Detectron1 detection model
        state = obj["blobs"]
    else:
        state = obj
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path}: its 'model' entry is a {type(state).__name__}, "
                              "not a state dict")
    if is_pickle and "model" not in obj:
        state = {k: v for k, v in state.items() if not str(k).endswith("_momentum")}
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {path}: state-dict key {key!r} is not a string")
        out[key] = _to_tensor(key, value, path)
    if out and all(k.startswith("module.") for k in out):
        out = OrderedDict((k[len("module."):], v) for k, v in out.items())
    if not out:
        raise CheckpointError(f"checkpoint {path} has an empty state dict")
    return out


# ----------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did (all key lists in checkpoint/model order)."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)        # in the model, not in the checkpoint
    unexpected: List[str] = field(default_factory=list)     # in the checkpoint, not in the model
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)        # IGNORED_KEYS skipped

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _fmt_shape(shape: Tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def _backbone_kind(keys) -> Optional[str]:
    keys = list(keys)
    if any(k.startswith("backbone.vit_module.") for k in keys):
        return "vit"
    if any(k.startswith(("backbone.stem.", "backbone.res")) for k in keys):
        return "resnet"
    return None


_ADAPTER_PREFIXES = ("backbone.spm.", "backbone.interactions.", "backbone.level_embed",
                     "backbone.up.", "backbone.norm")


def _backbone_hint(report: "LoadReport") -> str:
    """Name the backbone mix-up behind a mismatch (ViT-Adapter-L weights for a ResNet config,
    the reverse, or a DINOv2 ViT without the adapter), or ''."""
    mismatched = [k for k, _, _ in report.mismatched]
    in_ckpt = report.loaded + report.unexpected + mismatched
    in_model = report.loaded + report.missing + mismatched
    ckpt, model = _backbone_kind(in_ckpt), _backbone_kind(in_model)
    if ckpt == "vit" and model == "resnet":
        return (": the checkpoint holds a ViT-Adapter-L backbone (backbone.vit_module.*) but the "
                "config builds a ResNet: use the ViT-Adapter config it was trained with "
                "(--config vitl-ovis, vitl-ytvis19 or vitl-ytvis21, or the official "
                "vit_adapter/DAQ_Offline_VitAdapterL.yaml)")
    if ckpt == "resnet" and model == "vit":
        return (": the checkpoint holds a ResNet backbone (backbone.res2.*) but the config builds "
                "the ViT-Adapter-L: use the ResNet config it was trained with "
                "(--config r50-ovis, or the official DAQ_Offline_R50.yaml)")
    if ckpt == "vit" and model == "vit" and \
            any(k.startswith(_ADAPTER_PREFIXES) for k in report.missing) and \
            not any(k.startswith(_ADAPTER_PREFIXES) for k in in_ckpt):
        return (": the checkpoint has the DINOv2 ViT (backbone.vit_module.*) but not the adapter "
                "(backbone.spm.*, backbone.interactions.*, backbone.level_embed, backbone.up, "
                "backbone.norm1-4): a bare DINOv2 checkpoint or a truncated file, not a DVIS-DAQ "
                "ViT-Adapter-L model")
    return ""


def _mismatch_message(report: LoadReport, source: str, expected: str) -> str:
    parts = []
    for label, items in (("missing", report.missing), ("unexpected", report.unexpected)):
        shown = ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")
        parts.append(f"{len(items)} {label}" + (f" ({shown})" if items else ""))
    mm = report.mismatched
    shown = ", ".join(f"{k}: checkpoint {_fmt_shape(a)} vs model {_fmt_shape(b)}"
                      for k, a, b in mm[:_SHOW]) + (", ..." if len(mm) > _SHOW else "")
    parts.append(f"{len(mm)} shape-mismatched" + (f" ({shown})" if mm else ""))
    hint = ""
    for k, a, b in mm:
        if k.endswith("class_embed.weight") and len(a) == 2 and len(b) == 2 and a[0] != b[0]:
            hint = (f"; the checkpoint predicts {a[0] - 1} classes, the config {b[0] - 1}: "
                    "use the config of the dataset it was trained on")
            break
    backbone = _backbone_hint(report)
    if backbone:  # the diagnosis first, the key lists after it
        return (f"checkpoint {source} does not match the model {expected}{backbone}; details: "
                + "; ".join(parts))
    if not hint and not report.loaded:
        hint = "; no key matched at all: is this a DVIS-DAQ checkpoint for this architecture?"
    return (f"checkpoint {source} does not match the model {expected}: "
            + "; ".join(parts) + hint)


def load_checkpoint(model: nn.Module, path: Union[PathLike, Mapping[str, torch.Tensor]],
                    strict: bool = True, config_name: Optional[str] = None, *,
                    allow_unsafe_pickle: bool = False) -> LoadReport:
    """Load official weights into ``model`` (any ``nn.Module`` with official parameter names).

    Args:
        model: the PyTorch port (or any module); its ``state_dict()`` names and shapes are the
            expectation. Tensors are copied into it (dtype converted by ``load_state_dict``).
        path: checkpoint file (see :func:`load_state_dict_file`) or an already-read state dict.
        strict: raise unless every model key is present with the right shape and no unknown key
            is left (apart from ``IGNORED_KEYS``). With ``strict=False`` the matching tensors
            are loaded and the rest reported.
        config_name: the config the model was built from, named in the error message.
        allow_unsafe_pickle: see :func:`load_state_dict_file`.

    Returns:
        :class:`LoadReport`.

    Raises:
        InputError / CheckpointError: as :func:`load_state_dict_file`; CheckpointError (one
        line) on any key/shape mismatch in strict mode, listing the first 5 missing,
        unexpected and shape-mismatched keys with the count of each.

    Official counterpart: detectron2 ``DetectionCheckpointer._load_model`` (which only warns).
    """
    if isinstance(path, Mapping):
        state, source = OrderedDict(path), "<state dict>"
    else:
        state, source = load_state_dict_file(path, allow_unsafe_pickle=allow_unsafe_pickle), \
            os.fspath(path)
    expected = model.state_dict()
    report = LoadReport()
    for key, tensor in expected.items():
        if key not in state:
            (report.ignored if key in IGNORED_KEYS else report.missing).append(key)
    usable: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, tensor in state.items():
        if key not in expected:
            (report.ignored if key in IGNORED_KEYS else report.unexpected).append(key)
            continue
        want = tuple(expected[key].shape)
        got = tuple(tensor.shape)
        if want != got:
            report.mismatched.append((key, got, want))
            continue
        usable[key] = tensor
        report.loaded.append(key)
    if strict and not report.ok:
        expected_from = f"built from {config_name}" if config_name else f"({type(model).__name__})"
        raise CheckpointError(_mismatch_message(report, source, expected_from))
    bad = [k for k, t in usable.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"checkpoint {source} has NaN/Inf values in {len(bad)} tensor(s) "
                              f"({', '.join(bad[:_SHOW])}{', ...' if len(bad) > _SHOW else ''}); "
                              "the training run probably diverged: use an earlier checkpoint")
    result = model.load_state_dict(usable, strict=False)
    leftover = [k for k in result.unexpected_keys]
    if leftover:  # cannot happen: every usable key is a model key
        raise CheckpointError(f"checkpoint {source}: keys {leftover[:_SHOW]} were not accepted "
                              "by the model")
    return report


# ----------------------------------------------------------------------------------------------
# Seeded random checkpoints
# ----------------------------------------------------------------------------------------------
def official_empty_weight(num_classes: int, eos_coef: float = 0.1) -> torch.Tensor:
    """The criterion's class weights the official model saves: ones(K+1), last = ``eos_coef``.

    Official: ``DVIS_VideoSetCriterion.__init__`` (``empty_weight``), ``eos_coef`` =
    ``MODEL.MASK_FORMER.NO_OBJECT_WEIGHT`` (0.1).
    """
    w = torch.ones(num_classes + 1, dtype=torch.float32)
    w[-1] = eos_coef
    return w


def _generic_init(module: nn.Module) -> None:
    """Deterministic (given the global seed) values for every floating parameter."""
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            continue
        with torch.no_grad():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                nn.init.xavier_uniform_(p)
            elif leaf == "bias" or leaf.endswith("_bias"):
                p.zero_()
            elif leaf == "weight":
                p.fill_(1.0)
            else:
                nn.init.normal_(p, std=0.02)


def _module_reinit(module: nn.Module) -> None:
    """Each module's own init, children before parents (as construction order would have it)."""
    for sub in reversed(list(module.modules())):
        for meth in ("reset_parameters", "_reset_parameters"):
            fn = getattr(sub, meth, None)
            if callable(fn):
                try:
                    fn()
                except TypeError:  # a method of that name needing arguments: not an initialiser
                    pass


def _infer_num_classes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    for attr in ("num_classes",):
        value = getattr(model, attr, None)
        if isinstance(value, int):
            return value
    for key, t in state.items():
        if key.endswith("class_embed.weight") and t.dim() == 2:
            return int(t.shape[0]) - 1
    raise ValueError("cannot infer num_classes for daq_criterion.empty_weight (no class_embed in "
                     "the model); pass num_classes=")


def write_random_checkpoint(model: Union[nn.Module, Callable[[], nn.Module]], path: PathLike,
                            seed: int, *, num_classes: Optional[int] = None,
                            eos_coef: float = 0.1) -> str:
    """Write a seeded random-init checkpoint in the official layout ``{"model": state_dict}``.

    Args:
        model: a zero-argument factory returning the module (preferred: it is then built with
            ``torch.manual_seed(seed)``, i.e. exactly its constructors' own init), or a module
            (a deep copy is re-initialised under the seed: every floating parameter first gets
            a generic init -- xavier-uniform for >=2-D, ones/zeros for 1-D weight/bias --, then
            each submodule's ``reset_parameters``/``_reset_parameters`` runs, children before
            parents; buffers keep their values). ``model`` itself is not modified.
        path: output file (``.pth``); parent folders are created. Written atomically: a temp
            file in the same folder, fsync, then rename; on failure nothing is left behind.
        seed: the same seed and architecture give byte-identical tensors. The caller's global
            RNG state is preserved.
        num_classes: K for ``daq_criterion.empty_weight`` (K+1 entries) when the model has no
            such buffer; default: ``model.num_classes`` or the rows of a ``*class_embed.weight``
            minus one.
        eos_coef: last entry of ``empty_weight`` (``MODEL.MASK_FORMER.NO_OBJECT_WEIGHT``).

    Returns:
        ``path`` as a string.

    The state dict holds every ``state_dict()`` entry of the model, plus
    ``daq_criterion.empty_weight`` inserted where the official model has it (before the first
    ``refiner.`` key; at the end otherwise).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if isinstance(model, nn.Module):
            net = copy.deepcopy(model)
            _generic_init(net)
            _module_reinit(net)
        elif callable(model):
            net = model()
            if not isinstance(net, nn.Module):
                raise TypeError(f"model factory returned {type(net).__name__}, not an nn.Module")
        else:
            raise TypeError(f"model must be an nn.Module or a factory, got {type(model).__name__}")
    state = OrderedDict((k, v.detach().to("cpu").clone().contiguous())
                        for k, v in net.state_dict().items())
    if _EMPTY_WEIGHT_KEY not in state:
        k = num_classes if num_classes is not None else _infer_num_classes(net, state)
        items = list(state.items())
        at = next((i for i, (key, _) in enumerate(items) if key.startswith("refiner.")), len(items))
        items.insert(at, (_EMPTY_WEIGHT_KEY, official_empty_weight(int(k), eos_coef)))
        state = OrderedDict(items)
    _atomic_torch_save({"model": state}, os.fspath(path))
    return os.fspath(path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`dvis_trt.fileio.atomic_output` (temp + rename)."""
    from dvis_trt.fileio import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


