"""Configuration: read the official detectron2-style YAML files without detectron2 (no torch).

Resolution follows the official entry points (``train_net_video.py`` ``setup`` and
``demo_video/demo.py`` ``setup_cfg``)::

    defaults  <-  _BASE_ chain  <-  the file  <-  overrides

* **defaults** are ``configs/defaults.yaml`` (shipped with this package): every key detectron2's
  ``get_cfg()`` defines plus the project's ``add_deeplab_config``, ``add_maskformer2_config``,
  ``add_maskformer2_video_config``, ``add_minvis_config``, ``add_dvis_config``,
  ``add_ctvis_config`` and ``add_daq_config``, applied in that order.
* **_BASE_ chain** (fvcore ``CfgNode.load_yaml_with_base``): a file's ``_BASE_`` (a path, or a
  list of paths merged in order) is loaded first, relative to the referring file's folder unless
  absolute; the file's own mapping is merged on top, recursively (a mapping merges into a
  mapping, anything else replaces). Later files override earlier ones.
* **merge into the defaults** (yacs ``_merge_a_into_b``): string values are decoded with
  ``ast.literal_eval`` when they parse (so ``STEPS: (7000,)`` is the tuple ``(7000,)`` and
  ``"1e-4"`` the float 0.0001), then type-checked against the default: same type, or either
  side ``None``, or list <-> tuple. We additionally accept an int where the default is a float
  (lossless; yacs would reject it). Other mismatches raise :class:`InputError` naming the key
  and the file that set it.
* **unknown keys** (not in the defaults) are kept as written (strings decoded); the official
  code raises ``KeyError`` for them. dvis-trt reads one such key, ``DVIS_TRT.CLASS_NAMES``
  (optional class names for custom datasets, see :func:`inference_values`).
* **overrides**: ``["MODEL.X=1", ...]``, detectron2 ``opts`` pairs ``["MODEL.X", "1", ...]``,
  or a dict (dotted or nested keys). String values are decoded like file values (yacs
  ``merge_from_list``); the key must exist.

Example: ``configs/dvis_daq/ovis/DAQ_Offline_R50.yaml`` resolves ``INPUT.MIN_SIZE_TEST`` to
480: its base ``Base-OVIS-VideoInstanceSegmentation.yaml`` says 360 and ``MinVIS_R50.yaml``
(later in the chain) says 480.
"""
from __future__ import annotations

import ast
import copy
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import yaml

from dvis_trt.errors import InputError

__all__ = [
    "Config",
    "load_config",
    "default_config",
    "inference_values",
    "inference_config",
    "dataset_class_names",
    "DEFAULTS_PATH",
    "DATASETS_PATH",
]

BASE_KEY = "_BASE_"
CONFIG_VERSION = 2  # detectron2 config/defaults.py ``_C.VERSION``
DEFAULTS_PATH = Path(__file__).resolve().parent / "configs" / "defaults.yaml"
DATASETS_PATH = Path(__file__).resolve().parent / "configs" / "datasets.yaml"

# Backbone ``size_divisibility`` used when MODEL.MASK_FORMER.SIZE_DIVISIBILITY < 0 (official
# ``MinVIS.__init__`` then asks the backbone): detectron2 ``Backbone`` defaults to 0 (ResNet does
# not override it); the project's Swin and ViT-Adapter backbones return 32.
_BACKBONE_SIZE_DIVISIBILITY = {
    "build_resnet_backbone": 0,
    "D2SwinTransformer": 32,
    "D2VitAdapterDinoV2": 32,
}

_LEAF_TYPES = (str, int, float, bool, type(None), list, tuple)

try:  # the C loader parses the same YAML 1.1 as SafeLoader, just faster
    _YamlLoader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _YamlLoader = yaml.SafeLoader


# ----------------------------------------------------------------------------------------------
# The read-only config object
# ----------------------------------------------------------------------------------------------
def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """Deep copy into plain YAML-able Python: dicts, lists, scalars."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Config(Mapping):
    """A resolved configuration: a nested, read-only mapping with attribute access.

    ``cfg.MODEL.MASK_FORMER.HIDDEN_DIM`` and ``cfg["MODEL"]["MASK_FORMER"]["HIDDEN_DIM"]`` are
    the same value; ``cfg.get("MODEL.MASK_FORMER.HIDDEN_DIM", default)`` follows dotted paths.
    Sections are ``Config`` objects, sequences are tuples (lists in :meth:`to_dict`), scalars
    are ``str``/``int``/``float``/``bool``/``None``. Assignment raises ``TypeError``.

    ``source`` is the path of the YAML file the config was resolved from (``None`` for the
    defaults); it is the same object for every section.
    """

    __slots__ = ("_data", "_prefix", "_source")

    def __init__(self, data: Mapping, *, source: Optional[str] = None, _prefix: str = ""):
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_prefix", _prefix)
        object.__setattr__(self, "_source", source)

    # -- Mapping protocol ------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        if isinstance(value, Mapping):
            return Config(value, source=self._source, _prefix=f"{self._prefix}{key}.")
        return _freeze(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    # -- attribute access ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # internals / dunder probes (copy, pickle); use cfg[key]
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {self._prefix}{name}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"Config is read-only (tried to set {self._prefix}{name}); "
                        "pass overrides to load_config instead")

    def __delattr__(self, name: str) -> None:
        raise TypeError("Config is read-only")

    def __reduce__(self):
        return (_rebuild_config, (self._data, self._source, self._prefix))

    def __dir__(self) -> List[str]:
        return sorted(set(object.__dir__(self)) | set(self._data))

    # -- helpers ---------------------------------------------------------------------------
    @property
    def source(self) -> Optional[str]:
        """Path of the YAML file this config was resolved from, or ``None``."""
        return self._source

    def get(self, key: str, default: Any = None) -> Any:
        """Value at ``key``; a dotted ``"A.B.C"`` walks sections. ``default`` if absent."""
        if key in self._data:
            return self[key]
        node: Any = self
        for part in key.split("."):
            if not isinstance(node, Config) or part not in node._data:
                return default
            node = node[part]
        return node

    def to_dict(self) -> Dict[str, Any]:
        """A deep, mutable copy as plain dicts/lists/scalars (YAML- and JSON-able)."""
        return _plain(self._data)

    def dump_yaml(self) -> str:
        """The resolved config as YAML text (keys sorted, block style, like detectron2 ``dump``)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=True, default_flow_style=False)

    def __repr__(self) -> str:
        where = f" from {self._source}" if self._source else ""
        name = self._prefix.rstrip(".") or "root"
        return f"<Config {name}{where}: {len(self._data)} keys>"


def _rebuild_config(data: Mapping, source: Optional[str], prefix: str) -> Config:
    return Config(data, source=source, _prefix=prefix)


# ----------------------------------------------------------------------------------------------
# YAML reading and the _BASE_ chain (fvcore CfgNode.load_yaml_with_base semantics)
# ----------------------------------------------------------------------------------------------
def _read_yaml(path: str, referenced_by: Optional[str]) -> Dict[str, Any]:
    if not os.path.isfile(path):
        if referenced_by is not None:
            raise InputError(f"config file {path} not found (named by _BASE_ in {referenced_by}); "
                             "fix the _BASE_ path (it is relative to the referring file)")
        raise InputError(f"config file {path} not found; pass an existing .yaml file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.load(f, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        what = " ".join(str(x) for x in (err.context, err.problem) if x)
        if isinstance(err, yaml.constructor.ConstructorError):
            what += " (Python-specific YAML tags are not supported)"
        raise InputError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read config file {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}:1: a config file must be a YAML mapping of keys, "
                         f"got a {type(data).__name__}")
    return data


def _record_origin(origin: Dict[Tuple[str, ...], str], path: Tuple[str, ...], value: Any,
                   filename: str) -> None:
    origin[path] = filename
    if isinstance(value, dict):
        for k, v in value.items():
            _record_origin(origin, path + (k,), v, filename)


def _merge_raw(a: Dict[str, Any], b: Dict[str, Any], filename: str,
               origin: Dict[Tuple[str, ...], str], record: bool,
               path: Tuple[str, ...] = ()) -> None:
    """Merge mapping ``a`` (from ``filename``) into ``b``: values of ``a`` win.

    ``record``: note ``filename`` as the origin of every value taken from ``a`` (off when ``a``
    is an already-resolved base whose origins were noted while it was loaded).
    """
    for k, v in a.items():
        if isinstance(v, dict) and k in b:
            if not isinstance(b[k], dict):
                raise InputError(f"{filename}: key {'.'.join(path + (k,))} is a section there but "
                                 f"a value in {origin.get(path + (k,), 'its _BASE_')}; "
                                 "cannot inherit it")
            _merge_raw(v, b[k], filename, origin, record, path + (k,))
        else:
            b[k] = v
            if record:
                _record_origin(origin, path + (k,), v, filename)


def _load_with_base(filename: str, referenced_by: Optional[str], chain: Tuple[str, ...],
                    origin: Dict[Tuple[str, ...], str]) -> Dict[str, Any]:
    real = os.path.realpath(filename)
    if real in chain:
        raise InputError(f"_BASE_ cycle: {filename} (named in {referenced_by}) is already being "
                         "loaded; remove the loop from the _BASE_ chain")
    data = _read_yaml(filename, referenced_by)
    if BASE_KEY not in data:
        _record_origin(origin, (), data, filename)
        return data
    bases = data.pop(BASE_KEY)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise InputError(f"{filename}: _BASE_ must be a path or a list of paths, got {bases!r}")
    merged: Dict[str, Any] = {}
    for base in bases:
        if base.startswith(("http://", "https://")):
            raise InputError(f"{filename}: remote _BASE_ {base} is not supported; download it and "
                             "use a local path")
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(filename), base)
        loaded = _load_with_base(base, filename, chain + (real,), origin)
        _merge_raw(loaded, merged, base, origin, record=False)
    _merge_raw(data, merged, filename, origin, record=True)
    return merged


# ----------------------------------------------------------------------------------------------
# Merging into the defaults (yacs _merge_a_into_b / merge_from_list semantics)
# ----------------------------------------------------------------------------------------------
def _decode(value: Any) -> Any:
    """yacs ``_decode_cfg_value`` for one leaf: strings that are Python literals become them."""
    if not isinstance(value, str):
        return value
    try:
        decoded = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    # yacs would keep e.g. a set or a dict here and then fail its type check; we keep the text
    return decoded if isinstance(decoded, _LEAF_TYPES) else value


def _decode_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _decode_tree(v) for k, v in value.items()}
    value = _decode(value)
    return _plain(value) if isinstance(value, tuple) else value


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a section"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _coerce(new: Any, old: Any, key: str, where: str) -> Any:
    """yacs ``_check_and_coerce_cfg_value_type`` (+ int -> float)."""
    if type(new) is type(old) or new is None or old is None:
        return _plain(new) if isinstance(new, tuple) else new
    if isinstance(new, (list, tuple)) and isinstance(old, (list, tuple)):
        return _plain(new)
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    raise InputError(f"{where}: config key {key} must be {_type_name(old)} like its default "
                     f"{old!r}, got {new!r}")


def _merge_into(dst: Dict[str, Any], src: Dict[str, Any], origin: Dict[Tuple[str, ...], str],
                path: Tuple[str, ...] = ()) -> None:
    for k, raw in src.items():
        p = path + (k,)
        key = ".".join(p)
        if k not in dst:
            dst[k] = _decode_tree(raw)  # unknown key: kept as written
            continue
        old = dst[k]
        if isinstance(old, dict):
            if not isinstance(raw, dict):
                raise InputError(f"{origin.get(p, '?')}: config key {key} is a section, "
                                 f"got the value {raw!r}")
            _merge_into(old, raw, origin, p)
        elif isinstance(raw, dict):
            raise InputError(f"{origin.get(p, '?')}: config key {key} is a value "
                             f"(default {old!r}), got a section")
        else:
            dst[k] = _coerce(_decode(raw), old, key, origin.get(p, "?"))


def _override_items(overrides: Union[Sequence[str], Mapping, None]) -> List[Tuple[str, Any, str]]:
    """Normalise overrides to (dotted key, value, how it was written) triples."""
    if overrides is None:
        return []
    items: List[Tuple[str, Any, str]] = []
    if isinstance(overrides, Mapping):
        def walk(prefix: str, m: Mapping) -> None:
            for k, v in m.items():
                if not isinstance(k, str):
                    raise InputError(f"override keys must be strings, got {k!r}")
                full = f"{prefix}{k}"
                if isinstance(v, Mapping):
                    walk(full + ".", v)
                else:
                    items.append((full, v, f"override {full}={v!r}"))
        walk("", overrides)
        return items
    if isinstance(overrides, (str, bytes)):
        raise InputError("overrides must be a list like ['MODEL.X=1'] or a dict, got a string")
    seq = list(overrides)
    i = 0
    while i < len(seq):
        item = seq[i]
        if not isinstance(item, str):
            raise InputError(f"override {item!r} must be a string 'KEY=VALUE'")
        if "=" in item:
            key, value = item.split("=", 1)
            items.append((key.strip(), value, f"override {item!r}"))
            i += 1
        elif i + 1 < len(seq) and isinstance(seq[i + 1], str):  # detectron2 opts: KEY VALUE
            items.append((item.strip(), seq[i + 1], f"override {item} {seq[i + 1]!r}"))
            i += 2
        else:
            raise InputError(f"override {item!r} has no value; write it as {item}=VALUE")
    return items


def _apply_overrides(tree: Dict[str, Any], overrides: Union[Sequence[str], Mapping, None]) -> None:
    for key, value, how in _override_items(overrides):
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise InputError(f"{how}: malformed key {key!r}; use dotted names like MODEL.WEIGHTS")
        node = tree
        for depth, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                raise InputError(f"{how}: unknown config key {key} "
                                 f"({'.'.join(parts[:depth + 1])} is not a section)")
            node = nxt
        last = parts[-1]
        if last not in node:
            raise InputError(f"{how}: unknown config key {key}; check the spelling "
                             "(overrides can only change existing keys)")
        if isinstance(node[last], dict):
            raise InputError(f"{how}: config key {key} is a section; override its entries instead")
        node[last] = _coerce(_decode(value), node[last], key, how)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _defaults_tree() -> Dict[str, Any]:
    data = _read_yaml(str(DEFAULTS_PATH), None)
    return data


def default_config() -> Config:
    """The official defaults alone (no file merged): ``configs/defaults.yaml``."""
    return Config(copy.deepcopy(_defaults_tree()))


def load_config(path: Union[str, os.PathLike],
                overrides: Union[Sequence[str], Mapping, None] = None) -> Config:
    """Resolve an official DVIS-DAQ YAML config the way detectron2 + the official code do.

    Args:
        path: the YAML file (e.g. ``configs/dvis_daq/ovis/DAQ_Offline_R50.yaml``). ``_BASE_``
            paths inside it are relative to the file that names them.
        overrides: ``["MODEL.WEIGHTS=x.pth", ...]``, detectron2-style pairs
            ``["MODEL.WEIGHTS", "x.pth", ...]``, or a dict ``{"MODEL.WEIGHTS": "x.pth"}`` /
            ``{"MODEL": {"WEIGHTS": "x.pth"}}``; applied last (official ``merge_from_list``).

    Returns:
        :class:`Config` (read-only), ``source`` = the absolute path of the file (so a bundle can find it from anywhere).

    Raises:
        InputError: missing file or missing ``_BASE_`` file (naming the file that referenced
            it), invalid YAML (``file:line:col``), a ``_BASE_`` cycle, a value whose type does
            not match the official default (naming key and file), an unknown override key,
            or a config ``VERSION`` other than 2.

    Semantics: detectron2 ``get_cfg()`` + ``add_*_config`` (``configs/defaults.yaml``), fvcore
    ``CfgNode.load_yaml_with_base`` and yacs ``CfgNode.merge_from_other_cfg`` /
    ``merge_from_list``; see the module docstring for the (small, lenient) differences.
    """
    filename = os.fspath(path)
    origin: Dict[Tuple[str, ...], str] = {}
    loaded = _load_with_base(filename, None, (), origin)
    version = _decode(loaded.get("VERSION", CONFIG_VERSION))
    if version != CONFIG_VERSION:
        raise InputError(f"{origin.get(('VERSION',), filename)}: config VERSION {version!r} is not "
                         f"supported (only detectron2 v{CONFIG_VERSION} configs); upgrade the file")
    tree = copy.deepcopy(_defaults_tree())
    _merge_into(tree, loaded, origin)
    _apply_overrides(tree, overrides)
    return Config(tree, source=os.path.abspath(filename))


# ----------------------------------------------------------------------------------------------
# Values the exported bundle needs (manifest "config" block)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _datasets_table() -> Dict[str, Any]:
    return _read_yaml(str(DATASETS_PATH), None)


def dataset_class_names(dataset: str) -> Optional[List[str]]:
    """Category names (index = contiguous class id) of an official VIS dataset, else ``None``.

    Covers the OVIS, YouTube-VIS 2019 and 2021 (and 2022 val) splits the official
    ``dvis_Plus/data_video/datasets/builtin.py`` registers, with the names of
    ``dvis_Plus/data_video/datasets/ytvis.py`` (``OVIS_CATEGORIES``, ``YTVIS_CATEGORIES_2019``,
    ``YTVIS_CATEGORIES_2021``). The ``coco2*`` splits carry COCO's 80 classes officially and
    are not listed.
    """
    table = _datasets_table()
    category_set = table["datasets"].get(dataset)
    if category_set is None:
        return None
    return list(table["category_sets"][category_set])


def _class_names(cfg: Config, num_classes: int) -> Optional[List[str]]:
    explicit = cfg.get("DVIS_TRT.CLASS_NAMES")
    if explicit is not None:
        names = [str(n) for n in explicit]
        if len(names) != num_classes:
            raise InputError(f"{cfg.source}: DVIS_TRT.CLASS_NAMES has {len(names)} names but "
                             f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}")
        return names
    # the demo names classes after DATASETS.TEST[0]; the model's metadata is DATASETS.TRAIN[-1]
    candidates = list(cfg.get("DATASETS.TEST", ())) + list(reversed(cfg.get("DATASETS.TRAIN", ())))
    for name in candidates:
        names = dataset_class_names(str(name))
        if names is not None and len(names) == num_classes:
            return names
    return None


def inference_values(cfg: Config) -> Dict[str, Any]:
    """The ``config`` block of the bundle manifest (docs/architecture.md): what inference needs.

    Keys: ``source``, ``num_classes`` (K, MODEL.SEM_SEG_HEAD.NUM_CLASSES), ``num_queries``
    (MASK_FORMER.NUM_OBJECT_QUERIES), ``hidden_dim``, ``mask_dim`` (SEM_SEG_HEAD.MASK_DIM),
    ``num_new_ins``, ``num_slots`` (VIDEO_HEAD), ``pixel_mean``/``pixel_std`` (3 floats, RGB
    order for FORMAT RGB, 0..255 units), ``min_size_test``/``max_size_test`` (pixels),
    ``size_divisibility`` (pad H and W up to a multiple of it; 1 = no padding: official
    ``ImageList.from_tensors`` pads only when it is > 1; a negative config value means "ask the
    backbone"), ``inference_select_threshold``, ``aux_inference_select_threshold``,
    ``dis_fg_threshold``, ``ovis_infer``, ``noise_frame_num``, ``offline_topk_num``
    (VIDEO_HEAD), ``max_num`` (MASK_FORMER.TEST.MAX_NUM), ``refiner_window_size``
    (MASK_FORMER.TEST.WINDOW_SIZE), ``input_format`` (INPUT.FORMAT, "RGB"/"BGR"),
    ``class_names`` (list of K names or ``None``: from the non-official key
    ``DVIS_TRT.CLASS_NAMES`` if given, else from the official dataset named in
    DATASETS.TEST / DATASETS.TRAIN when its class count matches).

    Raises:
        InputError: a negative SIZE_DIVISIBILITY with a backbone we do not know, or
            ``DVIS_TRT.CLASS_NAMES`` of the wrong length.
    """
    mf = cfg.MODEL.MASK_FORMER
    vh = cfg.MODEL.VIDEO_HEAD
    num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    divisibility = int(mf.SIZE_DIVISIBILITY)
    if divisibility < 0:
        backbone = cfg.MODEL.BACKBONE.NAME
        if backbone not in _BACKBONE_SIZE_DIVISIBILITY:
            raise InputError(f"{cfg.source}: MODEL.MASK_FORMER.SIZE_DIVISIBILITY is {divisibility} "
                             f"(use the backbone's) but backbone {backbone} is unknown; set it "
                             "explicitly, e.g. MODEL.MASK_FORMER.SIZE_DIVISIBILITY=32")
        divisibility = _BACKBONE_SIZE_DIVISIBILITY[backbone]
    divisibility = max(divisibility, 1)
    return {
        "source": cfg.source,
        "num_classes": num_classes,
        "num_queries": int(mf.NUM_OBJECT_QUERIES),
        "hidden_dim": int(mf.HIDDEN_DIM),
        "mask_dim": int(cfg.MODEL.SEM_SEG_HEAD.MASK_DIM),
        "num_new_ins": int(vh.NUM_NEW_INS),
        "num_slots": int(vh.NUM_SLOTS),
        "pixel_mean": [float(x) for x in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(x) for x in cfg.MODEL.PIXEL_STD],
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "size_divisibility": divisibility,
        "inference_select_threshold": float(vh.INFERENCE_SELECT_THRESHOLD),
        "aux_inference_select_threshold": float(vh.AUX_INFERENCE_SELECT_THRESHOLD),
        "dis_fg_threshold": float(vh.DIS_FG_THRESHOLD),
        "ovis_infer": bool(vh.OVIS_INFER),
        "noise_frame_num": int(vh.NOISE_FRAME_NUM),
        "offline_topk_num": int(vh.OFFLINE_TOPK_NUM),
        "max_num": int(mf.TEST.MAX_NUM),
        "refiner_window_size": int(mf.TEST.WINDOW_SIZE),
        "input_format": str(cfg.INPUT.FORMAT),
        "class_names": _class_names(cfg, num_classes),
    }


def inference_config(cfg: Config):
    """The config's inference values as the one frozen type,
    :class:`~dvis_trt.runtime.bundle.config.InferenceConfig` (what the manifest stores, the
    pipeline and the eager model consume): ``InferenceConfig.from_dict(inference_values(cfg))``.

    Raises:
        InputError: as :func:`inference_values`; BundleError: a value out of range.
    """
    from dvis_trt.runtime.bundle.config import InferenceConfig

    return InferenceConfig.from_dict(inference_values(cfg))
