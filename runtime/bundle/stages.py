"""The five stages and their canonical tensor contracts (DESIGN.md's table), defined once.

Stage names, MSDA export modes, precisions, tensor dtypes, :class:`TensorSpec` /
:class:`StageSpec` and the :data:`STAGE_SPECS` template over the fixed symbols. The exporter
names graph I/O and dynamic axes from these; the runtime and the engine builder bind by them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from dvis_trt.errors import BundleError

from .shapes import Dim, _parse_dim, infer_dims, resolve_shape, shape_symbols, simplify_dim

__all__ = ["STAGE_NAMES", "ONLINE_STAGE_NAMES", "EXPORT_STAGE_NAMES", "MSDA_MODES", "PRECISIONS", "DTYPES", "TensorSpec", "StageSpec",
           "STAGE_SPECS", "FIXED_SYMBOLS", "stage_specs"]

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
