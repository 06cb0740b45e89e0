"""Checks and clean-up of an exported stage graph before it joins a bundle.

Polygraphy constant folding (:func:`fold_constants`), graph I/O shapes stamped from the stage spec,
and our TensorRT-friendliness checks (:func:`check_graph`: no bool graph I/O, none of
:data:`FORBIDDEN_OPS`, custom MSDA nodes only in the plugin modes, with their
``plugin_version`` / ``plugin_namespace`` attributes). Any failure raises :class:`ExportError`.
Used by :func:`dvis_trt.export.onnx_export.export_stage`; the official code has no counterpart
(it does not export ONNX).
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence, Union

import onnx

from dvis_trt.errors import BundleError, DependencyError
from dvis_trt.runtime.bundle import TensorSpec

from .model import msda as msda_mod

__all__ = ["FORBIDDEN_OPS", "ExportError", "check_graph", "fold_constants"]


#: Ops that must not appear in an exported stage: NonZero/ScatterND come from index assignment
#: (TensorRT builds them badly or not at all), Einsum should be MatMul, control flow and the
#: other data-dependent-shape ops would make a stage's output shape depend on tensor values.
FORBIDDEN_OPS = ("NonZero", "ScatterND", "Einsum", "Loop", "If", "Scan", "Unique", "Compress",
                 "NonMaxSuppression", "TopK")


class ExportError(BundleError):
    """An exported graph failed a check (checker, shape inference, TensorRT-friendliness)."""


# ---------------------------------------------------------------------------------------------
# graph checks
# ---------------------------------------------------------------------------------------------
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64",
                onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
                onnx.TensorProto.UINT8: "uint8"}


def _walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _walk_nodes(g)


def _value_shape(vi: onnx.ValueInfoProto) -> List[Union[int, str, None]]:
    out: List[Union[int, str, None]] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def check_graph(model: onnx.ModelProto, stage: str, inputs: Sequence[TensorSpec],
                outputs: Sequence[TensorSpec], msda: str) -> None:
    """TensorRT-friendliness and contract checks of one exported stage graph.

    Checks: graph input / output names, order, dtypes and ranks equal the stage spec; no bool
    graph I/O; none of :data:`FORBIDDEN_OPS` anywhere (subgraphs included); custom-domain nodes
    only in the plugin modes, and then exactly the MSDA node of the mode with string attributes
    ``plugin_version`` / ``plugin_namespace``.

    Raises:
        ExportError: one line naming the stage and what is wrong.
    """
    for kind, got, want in (("input", model.graph.input, inputs),
                            ("output", model.graph.output, outputs)):
        got_names = [v.name for v in got]
        want_names = [t.name for t in want]
        if got_names != want_names:
            raise ExportError(f"stage '{stage}': graph {kind}s {got_names} are not the "
                              f"expected {want_names}")
        for vi, spec in zip(got, want):
            dtype = _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
            if dtype == "bool":
                raise ExportError(f"stage '{stage}': graph {kind} '{vi.name}' is a bool tensor; "
                                  "TensorRT bindings must not be bool")
            if dtype != spec.dtype:
                raise ExportError(f"stage '{stage}': graph {kind} '{vi.name}' is {dtype}, the "
                                  f"stage contract says {spec.dtype}")
            if len(_value_shape(vi)) != len(spec.shape):
                raise ExportError(f"stage '{stage}': graph {kind} '{vi.name}' has shape "
                                  f"{_value_shape(vi)}, expected rank {len(spec.shape)} "
                                  f"{list(spec.shape)}")
    allowed_custom = set()
    if msda == "plugin":
        allowed_custom = {msda_mod.PLUGIN_OP}
    elif msda == "trt-builtin":
        allowed_custom = {msda_mod.TRT_BUILTIN_OP}
    for node in _walk_nodes(model.graph):
        if node.domain in ("", "ai.onnx"):
            if node.op_type in FORBIDDEN_OPS:
                raise ExportError(f"stage '{stage}': node '{node.name}' is {node.op_type}, which "
                                  "TensorRT builds badly or which makes shapes data-dependent; "
                                  "fix the model code (torch.where instead of index assignment, "
                                  "matmul instead of einsum)")
            continue
        if node.op_type not in allowed_custom or node.domain != msda_mod.PLUGIN_DOMAIN:
            raise ExportError(f"stage '{stage}': unexpected custom node {node.domain}::"
                              f"{node.op_type} in an --msda {msda} export")
        attrs = {a.name: a for a in node.attribute}
        for name in ("plugin_version", "plugin_namespace"):
            a = attrs.get(name)
            if a is None or a.type != onnx.AttributeProto.STRING:
                raise ExportError(f"stage '{stage}': custom node '{node.name}' lacks the string "
                                  f"attribute {name} the TensorRT ONNX parser reads")


def _stamp_io_shapes(model: onnx.ModelProto, inputs: Sequence[TensorSpec],
                     outputs: Sequence[TensorSpec]) -> None:
    """Write the spec's dims into the graph I/O (ints as dim_value, symbols as dim_param)."""
    for vis, specs in ((model.graph.input, inputs), (model.graph.output, outputs)):
        by_name = {t.name: t for t in specs}
        for vi in vis:
            spec = by_name.get(vi.name)
            if spec is None:
                continue
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in spec.shape:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = str(d)


@contextlib.contextmanager
def _quiet_polygraphy():
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:  # pragma: no cover - a hard dependency of the export extra
        raise DependencyError("constant folding needs Polygraphy: pip install polygraphy "
                              "onnx-graphsurgeon") from exc
    old_colors = getattr(G_LOGGER, "colors", None)
    try:
        G_LOGGER.colors = False
    except Exception:  # pragma: no cover
        pass
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            yield
    finally:
        if old_colors is not None:
            G_LOGGER.colors = old_colors


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Polygraphy constant folding (shape sub-graphs included), ONNX shape inference only
    (ONNX Runtime's symbolic shape inference writes temp files into the working directory).

    Raises DependencyError without polygraphy / onnx-graphsurgeon, ExportError if folding fails.
    """
    try:
        import onnx_graphsurgeon  # noqa: F401  (polygraphy imports it lazily; fail clearly here)
        from polygraphy.backend.onnx import fold_constants as pg_fold
    except ImportError as exc:
        raise DependencyError("constant folding needs Polygraphy and ONNX GraphSurgeon: pip "
                              "install polygraphy onnx-graphsurgeon") from exc
    try:  # Polygraphy folds through ONNX Runtime sessions, whose optimiser warns per node
        import onnxruntime
        onnxruntime.set_default_logger_severity(3)  # (e.g. every attention Unsqueeze of ViT-L)
    except ImportError:  # pragma: no cover - a runtime dependency
        pass
    with _quiet_polygraphy():
        try:
            return pg_fold(model, num_passes=None, do_shape_inference=True, fold_shapes=True,
                           partitioning=None, error_ok=False,
                           allow_onnxruntime_shape_inference=False)
        except Exception as exc:
            raise ExportError(f"constant folding failed: {str(exc).splitlines()[0][:300]}") \
                from exc
