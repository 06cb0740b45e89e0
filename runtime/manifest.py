"""The bundle manifest (``manifest.json``): dataclasses, loading with validation, atomic writing,
symbolic shapes, and the canonical per-stage tensor contracts (:data:`STAGE_SPECS`).

No torch here: the runtime, the engine builder and the exporter all import this module.

A bundle is a folder::

    bundle/
      manifest.json          # this module's schema (format_version 1, see INTERFACES.md)
      segmenter.onnx  tracker_first.onnx  tracker_step.onnx  refiner.onnx  mask_head.onnx
      constants.npz          # bg_slots, seg_query_feat, ... (host-side constants)
      engines/<gpu>-sm<cc>-trt<ver>-<precision>/   # written by `dvis-trt build` (engine/)

Symbolic shapes
---------------
A dim is an ``int`` or a string. A string is a symbol (``"T"``, ``"tQ"``) or an arithmetic
expression over symbols and integers with ``+ - *`` and ``/`` (exact integer division) or
``//`` (floor division), e.g. ``"tQ+5"``; strings carry no spaces. The stage symbols are
(DESIGN.md): segmenter ``T, Hp, Wp`` with ``h = Hp/4`` and ``w = Wp/4`` (:data:`DERIVED_DIMS`);
tracker ``h, w`` and ``tQ``; refiner ``L, Qr``; mask_head ``t, Qs, h, w``. The model
constants ``Q, C, D (mask_dim), K, N, S`` appear as numbers in a manifest (see
:func:`stage_specs`), as names only in the :data:`STAGE_SPECS` template.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from .errors import BundleError

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "STAGE_NAMES", "ONLINE_STAGE_NAMES", "EXPORT_STAGE_NAMES",
    "MSDA_MODES", "PRECISIONS", "DTYPES",
    "DERIVED_DIMS", "STAGE_SPECS", "Dim", "TensorSpec", "StageSpec", "ConstantsSpec",
    "BundleConfig", "BundleManifest", "stage_specs", "eval_dim", "resolve_shape",
    "shape_symbols", "simplify_dim", "infer_dims", "with_derived_dims", "sha256_file",
    "load_manifest", "write_manifest", "manifest_from_dict", "FIXED_SYMBOLS", "num_elements",
    "atomic_write_text",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Stage names in pipeline order (DESIGN.md's table).
STAGE_NAMES = ("segmenter", "tracker_first", "tracker_step", "refiner", "mask_head")
#: Stages of the online (per-frame) mode; ``tracker_masks`` is exported by default since it
#: exists, but is optional in a bundle (older bundles serve the offline mode only).
ONLINE_STAGE_NAMES = ("segmenter", "tracker_first", "tracker_step", "tracker_masks")
#: Every stage ``export`` writes by default (offline bundles serve both modes).
EXPORT_STAGE_NAMES = STAGE_NAMES + ("tracker_masks",)
MSDA_MODES = ("onnx", "plugin", "trt-builtin")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: Tensor dtype strings a manifest may use (numpy names).
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8")
#: Symbols defined from others when the latter are known (segmenter: mask features at stride 4).
DERIVED_DIMS = {"h": "Hp/4", "w": "Wp/4"}

Dim = Union[int, str]


# ---------------------------------------------------------------------------------------------
# symbolic dims
# ---------------------------------------------------------------------------------------------
_ALLOWED_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)


def _parse_dim(expr: str) -> ast.expr:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ValueError(f"bad symbolic dim {expr!r}: not an arithmetic expression") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Name, ast.Load, ast.BinOp, *_ALLOWED_BINOPS)):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, int) \
                and not isinstance(node.value, bool):
            continue
        raise ValueError(f"bad symbolic dim {expr!r}: only symbols, integers and + - * / // "
                         "are allowed")
    return tree.body


def _eval_node(node: ast.expr, dims: Mapping[str, int], expr: str) -> int:
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.Name):
        if node.id not in dims:
            raise KeyError(node.id)
        return int(dims[node.id])
    assert isinstance(node, ast.BinOp)
    a = _eval_node(node.left, dims, expr)
    b = _eval_node(node.right, dims, expr)
    if isinstance(node.op, ast.Add):
        return a + b
    if isinstance(node.op, ast.Sub):
        return a - b
    if isinstance(node.op, ast.Mult):
        return a * b
    if b == 0:
        raise ValueError(f"symbolic dim {expr!r} divides by zero")
    if isinstance(node.op, ast.FloorDiv):
        return a // b
    if a % b:
        raise ValueError(f"symbolic dim {expr!r}: {a} is not divisible by {b}")
    return a // b


def eval_dim(dim: Dim, dims: Mapping[str, int]) -> int:
    """Value of one dim given symbol values, e.g. ``eval_dim("tQ+5", {"tQ": 3}) == 8``.

    Raises ``KeyError(symbol)`` for an unbound symbol and ``ValueError`` for a malformed
    expression or an inexact ``/``.
    """
    if isinstance(dim, bool):
        raise ValueError(f"bad dim {dim!r}")
    if isinstance(dim, int):
        return dim
    return _eval_node(_parse_dim(dim), dims, dim)


def shape_symbols(shape: Sequence[Dim]) -> set[str]:
    """Every symbol name used in ``shape`` (``["tQ+5", 256] -> {"tQ"}``)."""
    out: set[str] = set()
    for d in shape:
        if isinstance(d, str):
            out |= {n.id for n in ast.walk(_parse_dim(d)) if isinstance(n, ast.Name)}
    return out


def with_derived_dims(dims: Mapping[str, int]) -> dict[str, int]:
    """``dims`` plus the :data:`DERIVED_DIMS` whose sources are bound (``Hp -> h = Hp/4``).

    Raises ``ValueError`` when a derived dim is given and disagrees with its source, or when
    ``Hp``/``Wp`` is not a multiple of 4.
    """
    out = dict(dims)
    for name, expr in DERIVED_DIMS.items():
        try:
            value = eval_dim(expr, out)
        except KeyError:
            continue
        if name in out and out[name] != value:
            raise ValueError(f"dim {name}={out[name]} disagrees with {name}={expr}={value}")
        out[name] = value
    return out


def resolve_shape(shape: Sequence[Dim], dims: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape from a symbolic one: ``resolve_shape(["T", 256, "h", "w"], {"T": 5,
    "Hp": 480, "Wp": 864}) == (5, 256, 120, 216)`` (derived dims are filled in).

    Raises ``ValueError`` naming the unbound symbol, or for a negative result.
    """
    full = with_derived_dims(dims)
    out = []
    for d in shape:
        try:
            v = eval_dim(d, full)
        except KeyError as exc:
            raise ValueError(f"shape {list(shape)}: symbol {exc.args[0]!r} has no value "
                             f"(given {sorted(full)})") from None
        if v < 0:
            raise ValueError(f"shape {list(shape)}: dim {d!r} evaluates to {v} < 0")
        out.append(v)
    return tuple(out)


def simplify_dim(dim: Dim, values: Mapping[str, int]) -> Dim:
    """Substitute the known ``values`` into ``dim`` and fold constants: ``simplify_dim("tQ+S",
    {"S": 5}) == "tQ+5"``, ``simplify_dim("K+1", {"K": 25}) == 26``. Unknown symbols stay."""
    if isinstance(dim, int):
        return dim

    def fold(node: ast.expr) -> ast.expr:
        if isinstance(node, ast.Name) and node.id in values:
            return ast.Constant(int(values[node.id]))
        if isinstance(node, ast.BinOp):
            left, right = fold(node.left), fold(node.right)
            if isinstance(left, ast.Constant) and isinstance(right, ast.Constant):
                return ast.Constant(_eval_node(ast.BinOp(left, node.op, right), {}, dim))
            return ast.BinOp(left, node.op, right)
        return node

    folded = fold(_parse_dim(dim))
    if isinstance(folded, ast.Constant):
        return int(folded.value)
    return ast.unparse(folded).replace(" ", "")


def infer_dims(specs: Iterable["TensorSpec"], shapes: Mapping[str, Sequence[int]],
               known: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bind symbols from concrete shapes, then check every dim (expressions included).

    ``specs``: the stage's input TensorSpecs; ``shapes``: name -> concrete shape for each.
    Plain-symbol dims bind their symbol; integer and expression dims are checked once all
    plain symbols are bound. Returns every bound symbol plus :data:`DERIVED_DIMS`.
    Raises ``ValueError`` (one line: tensor, axis, expected, got) on any disagreement.
    """
    bound: dict[str, int] = dict(known or {})
    specs = list(specs)
    for spec in specs:
        shape = tuple(int(x) for x in shapes[spec.name])
        if len(shape) != len(spec.shape):
            raise ValueError(f"'{spec.name}': shape {shape} has rank {len(shape)}, expected "
                             f"{len(spec.shape)} {list(spec.shape)}")
        for axis, (d, got) in enumerate(zip(spec.shape, shape)):
            if isinstance(d, str) and d.isidentifier():
                if d in bound and bound[d] != got:
                    raise ValueError(f"'{spec.name}' dim {axis} ({d}) is {got} but {d} is "
                                     f"{bound[d]} elsewhere")
                bound[d] = got
    bound = with_derived_dims(bound)
    for spec in specs:
        shape = tuple(int(x) for x in shapes[spec.name])
        for axis, (d, got) in enumerate(zip(spec.shape, shape)):
            try:
                want = eval_dim(d, bound)
            except KeyError:
                continue  # an expression over a symbol bound nowhere: nothing to check
            if want != got:
                raise ValueError(f"'{spec.name}' dim {axis} is {got}, expected {d} = {want}")
    return bound


# ---------------------------------------------------------------------------------------------
# dataclasses
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One stage input or output: name, numpy dtype string, symbolic shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given symbol values (see :func:`resolve_shape`)."""
        return resolve_shape(self.shape, dims)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "TensorSpec":
        try:
            name, dtype, shape = d["name"], d["dtype"], d["shape"]
        except (KeyError, TypeError):
            raise BundleError(f"{where}: a tensor entry lacks name/dtype/shape ({d!r}); "
                              "re-export the bundle") from None
        if dtype not in DTYPES:
            raise BundleError(f"{where}: tensor '{name}' has unknown dtype {dtype!r} "
                              f"(known: {', '.join(DTYPES)}); re-export the bundle")
        dims: list[Dim] = []
        for x in shape:
            if isinstance(x, bool) or not isinstance(x, (int, str)):
                raise BundleError(f"{where}: tensor '{name}' has a bad dim {x!r} in {shape}; "
                                  "re-export the bundle")
            if isinstance(x, str):
                try:
                    _parse_dim(x)
                except ValueError as exc:
                    raise BundleError(f"{where}: tensor '{name}': {exc}") from None
            dims.append(x)
        return cls(str(name), str(dtype), tuple(dims))


@dataclass(frozen=True)
class StageSpec:
    """One stage of a bundle: its ONNX file (relative to the bundle), checksum and I/O."""

    name: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: ONNX external data of a large graph (one file next to ``file``) and its checksum
    data_file: str | None = None
    data_sha256: str | None = None

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"stage '{self.name}' has no input '{name}'")

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"stage '{self.name}' has no output '{name}'")

    @property
    def symbols(self) -> set[str]:
        """The plain symbols of the inputs (the dims an engine profile must cover)."""
        out: set[str] = set()
        for t in self.inputs:
            out |= shape_symbols(t.shape)
        return out

    def output_shapes(self, input_shapes: Mapping[str, Sequence[int]]
                      ) -> dict[str, tuple[int, ...]]:
        """Concrete output shapes implied by concrete input shapes (raises ``ValueError``)."""
        dims = infer_dims(self.inputs, input_shapes)
        return {t.name: t.resolve(dims) for t in self.outputs}

    def to_dict(self) -> dict:
        d = {"file": self.file, "sha256": self.sha256}
        if self.data_file is not None:
            d["external_data"] = {"file": self.data_file, "sha256": self.data_sha256}
        d.update(inputs=[t.to_dict() for t in self.inputs],
                 outputs=[t.to_dict() for t in self.outputs])
        return d


@dataclass(frozen=True)
class ConstantsSpec:
    """Host-side constant arrays (``constants.npz``): file, checksum, name -> shape."""

    file: str
    sha256: str
    arrays: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256,
                "arrays": {k: list(v) for k, v in self.arrays.items()}}


# config fields: name -> (types accepted, required)
_CONFIG_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "source": ((str, type(None)), False),
    "num_classes": ((int,), True),
    "num_queries": ((int,), True),
    "hidden_dim": ((int,), True),
    "mask_dim": ((int,), True),
    "num_new_ins": ((int,), True),
    "num_slots": ((int,), True),
    "pixel_mean": ((list,), True),
    "pixel_std": ((list,), True),
    "min_size_test": ((int,), True),
    "max_size_test": ((int,), True),
    "size_divisibility": ((int,), True),
    "inference_select_threshold": ((float, int), True),
    "aux_inference_select_threshold": ((float, int), True),
    "dis_fg_threshold": ((float, int), True),
    "ovis_infer": ((bool,), True),
    "noise_frame_num": ((int,), True),
    "offline_topk_num": ((int,), True),
    "max_num": ((int,), True),
    "refiner_window_size": ((int,), True),
    "class_names": ((list, type(None)), False),
}


@dataclass(frozen=True)
class BundleConfig:
    """The model/inference settings the runtime needs (official config values; see
    INTERFACES.md). Unknown keys are kept in ``extra`` and written back unchanged."""

    num_classes: int
    num_queries: int
    hidden_dim: int
    mask_dim: int
    num_new_ins: int
    num_slots: int
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    min_size_test: int
    max_size_test: int
    size_divisibility: int
    inference_select_threshold: float
    aux_inference_select_threshold: float
    dis_fg_threshold: float
    ovis_infer: bool
    noise_frame_num: int
    offline_topk_num: int
    max_num: int
    refiner_window_size: int
    source: str | None = None
    class_names: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def dims(self) -> dict[str, int]:
        """The fixed stage dims: ``Q, C, D, K, N, S`` (see :func:`stage_specs`)."""
        return {"Q": self.num_queries, "C": self.hidden_dim, "D": self.mask_dim,
                "K": self.num_classes, "N": self.num_new_ins, "S": self.num_slots}

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _CONFIG_FIELDS}
        d["pixel_mean"] = list(self.pixel_mean)
        d["pixel_std"] = list(self.pixel_std)
        d["class_names"] = None if self.class_names is None else list(self.class_names)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "BundleConfig":
        if not isinstance(d, Mapping):
            raise BundleError("manifest 'config' is not an object; re-export the bundle")
        kw: dict[str, Any] = {}
        for name, (types, required) in _CONFIG_FIELDS.items():
            if name not in d:
                if required:
                    raise BundleError(f"manifest config lacks '{name}'; re-export the bundle "
                                      "with this dvis-trt version")
                kw[name] = None
                continue
            value = d[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise BundleError(f"manifest config '{name}' = {value!r} has the wrong type "
                                  f"(expected {'/'.join(t.__name__ for t in types)})")
            kw[name] = value
        for name in ("num_classes", "num_queries", "hidden_dim", "mask_dim", "num_new_ins",
                     "num_slots", "min_size_test", "max_size_test", "max_num",
                     "refiner_window_size", "offline_topk_num"):
            if kw[name] <= 0:
                raise BundleError(f"manifest config '{name}' = {kw[name]} must be positive")
        for name in ("pixel_mean", "pixel_std"):
            if len(kw[name]) != 3:
                raise BundleError(f"manifest config '{name}' needs 3 values (RGB), "
                                  f"got {kw[name]!r}")
            kw[name] = tuple(float(x) for x in kw[name])
        for name in ("inference_select_threshold", "aux_inference_select_threshold",
                     "dis_fg_threshold"):
            kw[name] = float(kw[name])
        from .validate import check_config_values  # finite, in range, consistent
        check_config_values({**kw, **{k: d[k] for k in ("input_format",) if k in d}})
        if kw["class_names"] is not None:
            if len(kw["class_names"]) != kw["num_classes"]:
                raise BundleError(f"manifest config has {len(kw['class_names'])} class_names "
                                  f"but num_classes = {kw['num_classes']}")
            kw["class_names"] = tuple(str(x) for x in kw["class_names"])
        extra = {k: v for k, v in d.items() if k not in _CONFIG_FIELDS}
        return cls(**kw, extra=extra)


@dataclass(frozen=True)
class BundleManifest:
    """A parsed ``manifest.json``. ``root`` (not serialised) is the folder it was read from."""

    config: BundleConfig
    stages: dict[str, StageSpec]
    msda: str = "onnx"
    precision: str = "fp32"
    producer: dict = field(default_factory=dict)
    constants: ConstantsSpec | None = None
    format_version: int = FORMAT_VERSION
    root: Path | None = field(default=None, compare=False)

    def stage(self, name: str) -> StageSpec:
        """The spec of ``name``; raises :class:`BundleError` if the bundle lacks it."""
        try:
            return self.stages[name]
        except KeyError:
            raise BundleError(f"bundle {self.root or ''} has no stage '{name}' (it has "
                              f"{', '.join(self.stages) or 'none'}); re-export it") from None

    def stage_path(self, name: str) -> Path:
        """Absolute path of a stage's ONNX file (needs ``root``)."""
        if self.root is None:
            raise BundleError("this manifest was not loaded from a folder; use load_manifest()")
        return self.root / self.stage(name).file

    @property
    def dims(self) -> dict[str, int]:
        """Fixed dims ``Q, C, D, K, N, S`` from the config."""
        return self.config.dims

    def to_dict(self) -> dict:
        d = {"format_version": self.format_version, "producer": dict(self.producer),
             "config": self.config.to_dict(), "msda": self.msda, "precision": self.precision,
             "stages": {k: v.to_dict() for k, v in self.stages.items()}}
        if self.constants is not None:
            d["constants"] = self.constants.to_dict()
        return d


# ---------------------------------------------------------------------------------------------
# canonical stage contracts
# ---------------------------------------------------------------------------------------------
def _t(name: str, shape: Sequence[Dim], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


#: Template of every stage's I/O (DESIGN.md's table), over the fixed symbols ``Q`` frame queries,
#: ``C`` hidden dim, ``D`` mask dim (= C in the official configs), ``K`` classes, ``N``
#: new-instance queries, ``S`` background slots. Use :func:`stage_specs` for concrete numbers.
#: Note ``tracker_step``'s updated position embedding is output ``track_pos_out``: an ONNX graph
#: (SSA) and a TensorRT engine cannot have an input and an output of the same name.
STAGE_SPECS: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {
    "segmenter": (
        (_t("images", ["T", 3, "Hp", "Wp"]),),
        (_t("mask_features", ["T", "D", "h", "w"]),
         _t("frame_embeds", ["T", "Q", "C"]),
         _t("pred_logits", ["T", "Q", "K+1"]),
         _t("mask_pooled", ["T", "Q", "D"])),
    ),
    "tracker_first": (
        (_t("frame_embeds", ["Q", "C"]),
         _t("mask_features", ["D", "h", "w"])),
        (_t("embeds", ["Q", "C"]),
         _t("pred_logits", ["Q", "K+1"]),
         _t("track_pos", ["Q", "C"])),
    ),
    "tracker_step": (
        (_t("track_queries", ["tQ", "C"]),
         _t("track_pos", ["tQ", "C"]),
         _t("frame_embeds", ["Q", "C"]),
         _t("mask_pooled", ["Q", "D"]),
         _t("mask_features", ["D", "h", "w"]),
         _t("slot_index", ["tQ+S"], "int64")),
        (_t("embeds", ["tQ+N", "C"]),
         _t("pred_logits", ["tQ+N", "K+1"]),
         _t("slot_logits", ["tQ", "K+1"]),
         _t("track_pos_out", ["tQ+N", "C"])),
    ),
    "refiner": (
        (_t("instance_embeds", ["L", "Qr", "C"]),
         _t("frame_embeds", ["L", "Q", "C"])),
        (_t("pred_logits", ["Qr", "K+1"]),
         _t("mask_embed", ["L", "Qr", "D"])),
    ),
    "mask_head": (
        (_t("mask_embed", ["t", "Qs", "D"]),
         _t("mask_features", ["t", "D", "h", "w"])),
        (_t("pred_masks", ["Qs", "t", "h", "w"]),),
    ),
    # online mode only (not needed by ``run``; bundles exported before it lack it)
    "tracker_masks": (
        (_t("embeds", ["tM", "C"]),
         _t("mask_features", ["D", "h", "w"])),
        (_t("pred_masks", ["tM", "h", "w"]),),
    ),
}

#: The fixed symbols of :data:`STAGE_SPECS`.
FIXED_SYMBOLS = ("Q", "C", "D", "K", "N", "S")


def stage_specs(Q: int, C: int, K: int, N: int, S: int, D: int | None = None
                ) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """:data:`STAGE_SPECS` with the fixed dims substituted: ``Q`` frame queries, ``C`` hidden
    dim, ``K`` classes (logits have ``K+1``), ``N`` new-instance queries, ``S`` background
    slots, ``D`` mask dim (default ``C``). E.g. ``stage_specs(100, 256, 25, 100, 5)`` gives
    ``tracker_step`` input ``slot_index`` int64 ``("tQ+5",)`` and output ``embeds``
    ``("tQ+100", 256)``. The exporter names graph I/O and dynamic axes from these; the
    runtime binds by them. Raises ``ValueError`` for non-positive dims.
    """
    values = {"Q": Q, "C": C, "K": K, "N": N, "S": S, "D": C if D is None else D}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"stage_specs: {k} must be a positive int, got {v!r}")
    out = {}
    for stage, (ins, outs) in STAGE_SPECS.items():
        conv = tuple(
            tuple(TensorSpec(t.name, t.dtype, tuple(simplify_dim(d, values) for d in t.shape))
                  for t in group) for group in (ins, outs))
        out[stage] = conv
    return out


# ---------------------------------------------------------------------------------------------
# load / write
# ---------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _safe_rel(file: Any, where: str) -> str:
    if not isinstance(file, str) or not file:
        raise BundleError(f"{where}: 'file' must be a file name, got {file!r}; "
                          "re-export the bundle")
    p = Path(file)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(f"{where}: file {file!r} points outside the bundle; file names must "
                          "be relative to the bundle folder")
    return file


def manifest_from_dict(d: Any, root: Path | None = None) -> BundleManifest:
    """Parse and validate a manifest dict (no file checks; see :func:`load_manifest`).

    Checks: format version, msda mode, precision, config fields and types, each stage's entry,
    and that each stage's input/output names are the canonical ones of :data:`STAGE_SPECS`
    with the right ranks, and integer dims equal to the config's. Raises :class:`BundleError`.
    """
    where = str(root / MANIFEST_NAME) if root is not None else MANIFEST_NAME
    if not isinstance(d, Mapping):
        raise BundleError(f"{where} is not a JSON object; re-export the bundle")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) \
                and version > FORMAT_VERSION:
            raise BundleError(f"{where} has format_version {version}, newer than this "
                              f"dvis-trt reads ({FORMAT_VERSION}); upgrade dvis-trt")
        raise BundleError(f"{where} has format_version {version!r}, this dvis-trt reads "
                          f"{FORMAT_VERSION}; re-export the bundle with `dvis-trt export`")
    msda = d.get("msda", "onnx")
    if msda not in MSDA_MODES:
        raise BundleError(f"{where}: msda {msda!r} is not one of {', '.join(MSDA_MODES)}")
    precision = d.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise BundleError(f"{where}: precision {precision!r} is not one of "
                          f"{', '.join(PRECISIONS)}")
    config = BundleConfig.from_dict(d.get("config"))
    stages_d = d.get("stages")
    if not isinstance(stages_d, Mapping) or not stages_d:
        raise BundleError(f"{where} lists no stages; re-export the bundle")
    canonical = stage_specs(**{k: v for k, v in config.dims.items()})
    stages: dict[str, StageSpec] = {}
    for name, sd in stages_d.items():
        sw = f"{where} stage '{name}'"
        if name not in STAGE_SPECS:
            raise BundleError(f"{sw}: unknown stage (known: {', '.join(STAGE_NAMES)})")
        if not isinstance(sd, Mapping):
            raise BundleError(f"{sw} is not an object; re-export the bundle")
        file = _safe_rel(sd.get("file"), sw)
        sha = sd.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise BundleError(f"{sw}: sha256 {sha!r} is not a hex sha256; re-export the bundle")
        ins = tuple(TensorSpec.from_dict(t, sw) for t in sd.get("inputs") or ())
        outs = tuple(TensorSpec.from_dict(t, sw) for t in sd.get("outputs") or ())
        for kind, got, want in (("inputs", ins, canonical[name][0]),
                                ("outputs", outs, canonical[name][1])):
            got_names = sorted(t.name for t in got)
            want_names = sorted(t.name for t in want)
            if got_names != want_names:
                raise BundleError(f"{sw}: {kind} {got_names} are not the expected "
                                  f"{want_names}; re-export the bundle with this dvis-trt")
            wmap = {t.name: t for t in want}
            for t in got:
                w = wmap[t.name]
                if len(t.shape) != len(w.shape):
                    raise BundleError(f"{sw}: '{t.name}' has rank {len(t.shape)} "
                                      f"{list(t.shape)}, expected {list(w.shape)}")
                for axis, (a, b) in enumerate(zip(t.shape, w.shape)):
                    if isinstance(a, int) and isinstance(b, int) and a != b:
                        raise BundleError(
                            f"{sw}: '{t.name}' dim {axis} is {a} but the config says {b} "
                            f"(shape {list(w.shape)}); the manifest and its config disagree")
        data_file = data_sha = None
        xd = sd.get("external_data")
        if xd is not None:
            if not isinstance(xd, Mapping):
                raise BundleError(f"{sw}: 'external_data' is not an object; re-export the bundle")
            data_file = _safe_rel(xd.get("file"), f"{sw} external data")
            data_sha = xd.get("sha256")
            if not isinstance(data_sha, str) or len(data_sha) != 64:
                raise BundleError(f"{sw}: external data sha256 {data_sha!r} is not a hex sha256; "
                                  "re-export the bundle")
        stages[name] = StageSpec(name, file, sha, ins, outs, data_file, data_sha)
    constants = None
    cd = d.get("constants")
    if cd is not None:
        cw = f"{where} constants"
        if not isinstance(cd, Mapping):
            raise BundleError(f"{cw} is not an object; re-export the bundle")
        file = _safe_rel(cd.get("file"), cw)
        sha = cd.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise BundleError(f"{cw}: sha256 {sha!r} is not a hex sha256; re-export the bundle")
        arrays = {}
        for k, v in (cd.get("arrays") or {}).items():
            if not isinstance(v, list) or not all(isinstance(x, int) for x in v):
                raise BundleError(f"{cw}: array '{k}' has a bad shape {v!r}")
            arrays[str(k)] = tuple(v)
        constants = ConstantsSpec(file, sha, arrays)
    producer = d.get("producer") or {}
    if not isinstance(producer, Mapping):
        raise BundleError(f"{where}: 'producer' is not an object")
    return BundleManifest(config=config, stages=stages, msda=msda, precision=precision,
                          producer=dict(producer), constants=constants,
                          format_version=FORMAT_VERSION, root=root)


def load_manifest(bundle_dir: str | os.PathLike, *, verify: bool = True,
                  require_stages: Iterable[str] | None = STAGE_NAMES) -> BundleManifest:
    """Read and validate ``bundle_dir/manifest.json``.

    ``verify``: check every stage file and the constants file exist and match their sha256
    (reads them all; hashing a few hundred MB takes about a second). ``require_stages``: stages
    that must be present (default: all five; ``None``/``()`` accepts a partial bundle).
    Returns a :class:`BundleManifest` with ``root`` set to the bundle folder.
    Raises :class:`BundleError` with one line naming the file and what to do.
    """
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; export one with "
                          "`dvis-trt export`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a dvis-trt bundle; export "
                          "one with `dvis-trt export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} cannot be read as JSON ({exc}); re-export the bundle") \
            from None
    manifest = manifest_from_dict(data, root)
    missing = [s for s in (require_stages or ()) if s not in manifest.stages]
    if missing:
        raise BundleError(f"{path} lacks stage(s) {', '.join(missing)}; re-export the "
                          "complete bundle")
    if verify:
        entries = [(f"stage '{n}'", s.file, s.sha256) for n, s in manifest.stages.items()]
        entries += [(f"stage '{n}' external data", s.data_file, s.data_sha256)
                    for n, s in manifest.stages.items() if s.data_file]
        if manifest.constants is not None:
            entries.append(("constants", manifest.constants.file, manifest.constants.sha256))
        for what, file, sha in entries:
            fp = root / file
            if not fp.is_file():
                raise BundleError(f"{fp} ({what}) is missing from the bundle; copy the whole "
                                  "bundle folder or re-export it")
            got = sha256_file(fp)
            if got != sha:
                raise BundleError(f"{fp} ({what}) does not match its sha256 in the manifest "
                                  f"(got {got[:12]}…, expected {sha[:12]}…): it was modified "
                                  "or partly copied; re-export the bundle")
    return manifest


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`dvis_trt.runtime.results.atomic_output`)."""
    from .results import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_manifest(bundle_dir: str | os.PathLike, manifest: BundleManifest, *,
                   hash_files: bool = True) -> BundleManifest:
    """Write ``bundle_dir/manifest.json`` atomically (temp file + fsync + rename).

    ``hash_files``: recompute every stage's and the constants' sha256 from the files in
    ``bundle_dir`` (they must exist) — what the exporter wants after writing the ONNX files.
    The manifest is validated (:func:`manifest_from_dict`) before anything is written.
    Returns the manifest as written, with ``root`` set. Raises :class:`BundleError`.
    """
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; create it first")
    if hash_files:
        stages = {}
        for n, s in manifest.stages.items():
            fp = root / _safe_rel(s.file, f"stage '{n}'")
            if not fp.is_file():
                raise BundleError(f"{fp} (stage '{n}') does not exist; write the stage file "
                                  "before the manifest")
            stages[n] = dataclasses.replace(s, sha256=sha256_file(fp))
            if s.data_file:
                dp = root / _safe_rel(s.data_file, f"stage '{n}' external data")
                if not dp.is_file():
                    raise BundleError(f"{dp} (stage '{n}' external data) does not exist; write "
                                      "it before the manifest")
                stages[n] = dataclasses.replace(stages[n], data_sha256=sha256_file(dp))
        constants = manifest.constants
        if constants is not None:
            fp = root / _safe_rel(constants.file, "constants")
            if not fp.is_file():
                raise BundleError(f"{fp} (constants) does not exist; write it before the "
                                  "manifest")
            constants = dataclasses.replace(constants, sha256=sha256_file(fp))
        manifest = dataclasses.replace(manifest, stages=stages, constants=constants)
    data = manifest.to_dict()
    checked = manifest_from_dict(json.loads(json.dumps(data)), root)  # round-trip validation
    atomic_write_text(root / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")
    return checked


def num_elements(shape: Sequence[int]) -> int:
    """Product of a concrete shape (1 for a scalar)."""
    return math.prod(int(x) for x in shape)
