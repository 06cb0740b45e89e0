"""FLOPs of the exported stage graphs, counted from the ONNX graphs themselves (not by hand).

Method: the stage graph's symbolic input dims are replaced by the concrete shapes a real run fed
it; shapes are propagated through the graph by two independent shape inferences and merged dim by
dim — ONNX's own (``onnx.shape_inference.infer_shapes(..., data_prop=True)``, which constant-
propagates shape arithmetic) and ONNX Runtime's symbolic shape inference
(``onnxruntime.tools.symbolic_shape_infer``, which resolves more Reshape chains). Neither alone
resolves every tensor of our graphs (the deformable-attention value slices are read off
``spatial_shapes`` data); together they do. Custom MSDA nodes (``--msda plugin`` /
``trt-builtin``) have no shape function: their output ``(N, Lq, M*D)`` is computed from their
inputs and stamped, then inference is rerun. No extra package is needed (``onnx-tool`` was not
used).

Counting convention (one multiply-add = 2 FLOPs):

* **GEMM-class** (what a GEMM-rate roofline applies to): ``MatMul`` 2·prod(out)·K; ``Gemm``
  2·M·N·K; ``Conv`` 2·prod(out)·(C_in/groups)·prod(kernel); ``ConvTranspose``
  2·prod(in)·(C_out/groups)·prod(kernel). Bias additions are not counted.
* **other** (approximate, memory-bound in practice): elementwise ops 1 per output element,
  ``Sigmoid``/``Tanh``/``Erf``/``Exp`` 4, ``Softmax`` 5, normalisations 8, reductions 1 per input
  element, ``GridSample`` (bilinear) 9 per output element, ``Resize`` 8, pooling kernel size,
  the MSDA node L·P·9 per output element. Pure data movement (Reshape, Transpose, Gather,
  Concat, Slice, ...) counts 0.

Nodes whose shapes stay unknown are listed in :attr:`GraphFlops.unresolved` (never silently
dropped).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from dvis_trt.plugins import identity


__all__ = ["GraphFlops", "GEMM_OPS", "count_graph_flops", "concretize", "infer_concrete_shapes",
           "node_flops", "FlopCounter"]

GEMM_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul",
            "QLinearConv", "FusedMatMul")

#: approximate non-GEMM FLOPs per output element
_ELEMENTWISE_1 = {"Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Neg", "Abs", "Sqrt",
                  "Reciprocal", "Pow", "Max", "Min", "Clip", "Where", "Sin", "Cos", "Floor",
                  "Ceil", "Round", "PRelu", "Sum", "Mean", "Greater", "Less", "Equal", "And",
                  "Or", "Not", "Sign", "BiasAdd"}
_ELEMENTWISE_4 = {"Sigmoid", "Tanh", "Erf", "Exp", "Log", "HardSigmoid", "Softplus", "Gelu",
                  "FastGelu", "QuickGelu", "HardSwish", "Mish"}
_NORMS = {"LayerNormalization", "InstanceNormalization", "GroupNormalization",
          "BatchNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"}
_REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
           "ReduceSumSquare", "CumSum", "ArgMax", "ArgMin"}
_MSDA_OPS = set(identity.MSDA_OP_TYPES)

Shape = List[Optional[int]]


@dataclass
class GraphFlops:
    """FLOPs of one graph at one set of input shapes.

    Attributes:
        gemm: GEMM-class FLOPs (MatMul / Gemm / Conv / ConvTranspose), exact for the shapes.
        other: approximate FLOPs of every other op (see the module docstring).
        by_op: op type -> FLOPs.
        nodes: number of nodes counted.
        unresolved: names of nodes whose shapes could not be inferred (their FLOPs are missing).
    """

    gemm: float = 0.0
    other: float = 0.0
    by_op: Dict[str, float] = field(default_factory=dict)
    nodes: int = 0
    unresolved: List[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.gemm + self.other

    def scaled(self, factor: float) -> "GraphFlops":
        """A copy with every count multiplied by ``factor`` (e.g. ``1/T`` per frame)."""
        return GraphFlops(self.gemm * factor, self.other * factor,
                          {k: v * factor for k, v in self.by_op.items()}, self.nodes,
                          list(self.unresolved))

    def __iadd__(self, other: "GraphFlops") -> "GraphFlops":
        self.gemm += other.gemm
        self.other += other.other
        for k, v in other.by_op.items():
            self.by_op[k] = self.by_op.get(k, 0.0) + v
        self.nodes += other.nodes
        self.unresolved.extend(n for n in other.unresolved if n not in self.unresolved)
        return self

    def to_dict(self) -> dict:
        return {"gemm": self.gemm, "other": self.other, "total": self.total,
                "by_op": dict(sorted(self.by_op.items(), key=lambda kv: -kv[1])),
                "nodes": self.nodes, "unresolved": list(self.unresolved)}


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def _load(model) -> "onnx.ModelProto":  # noqa: F821
    import onnx
    if isinstance(model, onnx.ModelProto):
        return model
    # shapes only: initializer dims are in the graph even when their data is external
    return onnx.load(os.fspath(model), load_external_data=False)


def concretize(model, input_shapes: Mapping[str, Sequence[int]]):
    """A copy of ``model`` whose graph inputs have the given concrete shapes and whose
    intermediate / output shape annotations are cleared (so inference starts from scratch).

    Raises ValueError when a graph input has no entry in ``input_shapes`` or a wrong rank.
    """
    m = copy.deepcopy(_load(model))
    inits = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        if vi.name not in input_shapes:
            raise ValueError(f"FLOP count: no shape given for graph input '{vi.name}' "
                             f"(have {sorted(input_shapes)})")
        shape = [int(d) for d in input_shapes[vi.name]]
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ValueError(f"FLOP count: input '{vi.name}' has rank {len(dims)} in the graph, "
                             f"got shape {tuple(shape)}")
        for d, v in zip(dims, shape):
            d.Clear()
            d.dim_value = v
    del m.graph.value_info[:]
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    # weights: only their shapes matter here; turning big float initializers into typed graph
    # inputs keeps the deep copies of the inference passes cheap (R50: ~300 MB of weights)
    import onnx
    small = []
    for init in m.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.BFLOAT16) and _prod(init.dims) > 64:
            m.graph.input.append(onnx.helper.make_tensor_value_info(
                init.name, init.data_type, [int(d) for d in init.dims]))
        else:
            small.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(small)
    return m


def _shapes_of(model) -> Dict[str, Optional[Shape]]:
    out: Dict[str, Optional[Shape]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out.setdefault(vi.name, None)
            continue
        out[vi.name] = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                        for d in tt.shape.dim]
    for init in g.initializer:
        out[init.name] = [int(d) for d in init.dims]
    for node in g.node:  # Constant nodes
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = [int(d) for d in a.t.dims]
    return out


def _merge(a: Dict[str, Optional[Shape]], b: Dict[str, Optional[Shape]]):
    """Dim-wise merge: a known dim wins over an unknown one; ranks must agree (else keep a)."""
    out = dict(a)
    for name, sb in b.items():
        sa = out.get(name)
        if sa is None:
            out[name] = sb
        elif sb is not None and len(sa) == len(sb):
            out[name] = [x if x is not None else y for x, y in zip(sa, sb)]
    return out


def _onnx_infer(model) -> Dict[str, Optional[Shape]]:
    import onnx
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - a failing inference just resolves less
        return {}
    return _shapes_of(inferred)


def _ort_infer(model) -> Dict[str, Optional[Shape]]:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # pragma: no cover - ships with onnxruntime
        return {}
    import contextlib
    import io
    import logging
    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            inferred = SymbolicShapeInference.infer_shapes(copy.deepcopy(model), auto_merge=True,
                                                           guess_output_rank=False)
    except Exception:  # noqa: BLE001
        return {}
    if inferred is None:
        return {}
    return _shapes_of(inferred)


def _known(s: Optional[Shape]) -> bool:
    return s is not None and all(isinstance(d, int) for d in s)


def _stamp(model, name: str, shape: Sequence[int], elem_type: int) -> None:
    import onnx
    vi = onnx.helper.make_tensor_value_info(name, elem_type, list(shape))
    model.graph.value_info.append(vi)


def infer_concrete_shapes(model, max_passes: int = 3) -> Dict[str, Optional[Shape]]:
    """Every tensor's shape (list of int, ``None`` per unknown dim; ``None`` for an unknown
    rank) in a graph whose inputs are concrete (see :func:`concretize`).

    Merges ONNX's and ONNX Runtime's shape inference; custom MSDA nodes get their output shape
    stamped from their inputs and inference is rerun (up to ``max_passes`` times).
    """
    import onnx
    m = copy.deepcopy(model)
    shapes: Dict[str, Optional[Shape]] = {}
    for _ in range(max(1, max_passes)):
        shapes = _merge(_onnx_infer(m), _ort_infer(m))
        shapes = _merge(shapes, _shapes_of(m))
        stamped = False
        for node in m.graph.node:
            if node.op_type in _MSDA_OPS and not _known(shapes.get(node.output[0])):
                value = shapes.get(node.input[0])
                loc = shapes.get(node.input[3]) if len(node.input) > 3 else None
                if _known(value) and _known(loc):
                    n, _, heads, d = value
                    lq = loc[1]
                    _stamp(m, node.output[0], [n, lq, heads * d], onnx.TensorProto.FLOAT)
                    stamped = True
        if not stamped:
            break
    return shapes


# ---------------------------------------------------------------------------------------------
# per-node formulas
# ---------------------------------------------------------------------------------------------
def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx
            return onnx.helper.get_attribute_value(a)
    return default


def _prod(xs: Iterable[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def node_flops(node, shapes: Mapping[str, Optional[Shape]]) -> Tuple[Optional[float], bool]:
    """``(flops, is_gemm)`` of one node given tensor shapes; ``flops`` is None when a shape it
    needs is unknown. See the module docstring for the formulas."""
    op = node.op_type

    def sh(i: int, out: bool = False) -> Optional[Shape]:
        names = node.output if out else node.input
        if i >= len(names) or not names[i]:
            return None
        s = shapes.get(names[i])
        return s if _known(s) else None

    if op in ("MatMul", "FusedMatMul", "MatMulInteger"):
        a, y = sh(0), sh(0, out=True)
        if a is None or y is None:
            return None, True
        k = a[-1] if len(a) >= 1 else 1
        if len(a) == 1:
            k = a[0]
        return 2.0 * _prod(y) * k, True
    if op == "Gemm":
        a, y = sh(0), sh(0, out=True)
        if a is None or y is None:
            return None, True
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2.0 * _prod(y) * k, True
    if op in ("Conv", "QLinearConv"):
        wi = 3 if op == "QLinearConv" else 1
        w, y = sh(wi), sh(0, out=True)
        if w is None or y is None:
            return None, True
        # W: (C_out, C_in/groups, k...) -> per output element C_in/groups * prod(k) MACs
        return 2.0 * _prod(y) * _prod(w[1:]), True
    if op == "ConvTranspose":
        x, w = sh(0), sh(1)
        if x is None or w is None:
            return None, True
        # W: (C_in, C_out/groups, k...); every input element scatters into C_out/groups*prod(k)
        return 2.0 * _prod(x) * _prod(w[1:]), True
    y = sh(0, out=True)
    if op in _MSDA_OPS:
        loc = sh(3)
        if y is None or loc is None:
            return None, False
        return 9.0 * _prod(y) * loc[3] * loc[4], False
    if op == "GridSample":
        return (None if y is None else 9.0 * _prod(y)), False
    if op in _ELEMENTWISE_1:
        return (None if y is None else float(_prod(y))), False
    if op in _ELEMENTWISE_4:
        return (None if y is None else 4.0 * _prod(y)), False
    if op in ("Softmax", "LogSoftmax"):
        return (None if y is None else 5.0 * _prod(y)), False
    if op in _NORMS:
        return (None if y is None else 8.0 * _prod(y)), False
    if op in _REDUCE:
        x = sh(0)
        return (None if x is None else float(_prod(x))), False
    if op == "Resize":
        return (None if y is None else 8.0 * _prod(y)), False
    if op in ("MaxPool", "AveragePool"):
        k = _attr(node, "kernel_shape", [1])
        return (None if y is None else float(_prod(y) * _prod(k))), False
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        x = sh(0)
        return (None if x is None else float(_prod(x))), False
    return 0.0, False  # data movement / shape ops


def count_graph_flops(model, input_shapes: Mapping[str, Sequence[int]]) -> GraphFlops:
    """FLOPs of an ONNX graph (path or ``ModelProto``) at concrete input shapes.

    Args:
        model: ONNX file path or ``onnx.ModelProto``.
        input_shapes: graph input name -> concrete shape (every non-initializer input).
    Returns:
        :class:`GraphFlops` (GEMM-class exact, other approximate, unresolved node names).
    Raises:
        ValueError: an input shape is missing or has the wrong rank.
    """
    m = concretize(model, input_shapes)
    shapes = infer_concrete_shapes(m)
    res = GraphFlops()
    stack = [m.graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            res.nodes += 1
            f, is_gemm = node_flops(node, shapes)
            if f is None:
                res.unresolved.append(node.name or f"{node.op_type}:{node.output[0]}")
                continue
            if f:
                res.by_op[node.op_type] = res.by_op.get(node.op_type, 0.0) + f
                if is_gemm:
                    res.gemm += f
                else:
                    res.other += f
    return res


class FlopCounter:
    """Caches :func:`count_graph_flops` per (graph file, input shapes): the pipeline calls
    ``tracker_step`` once per frame with a handful of distinct ``tQ``."""

    def __init__(self):
        self._models: Dict[str, object] = {}
        self._cache: Dict[Tuple, GraphFlops] = {}

    def __call__(self, path: Union[str, os.PathLike],
                 input_shapes: Mapping[str, Sequence[int]]) -> GraphFlops:
        key = (os.fspath(path),) + tuple(sorted((k, tuple(int(d) for d in v))
                                               for k, v in input_shapes.items()))
        hit = self._cache.get(key)
        if hit is None:
            p = os.fspath(path)
            if p not in self._models:
                self._models[p] = _load(p)
            hit = count_graph_flops(self._models[p], input_shapes)
            self._cache[key] = hit
        return hit.scaled(1.0)

    def stage_totals(self, paths: Mapping[str, Union[str, os.PathLike]],
                     calls: Sequence[Tuple[str, Mapping[str, Sequence[int]]]]
                     ) -> Dict[str, GraphFlops]:
        """Sum over a recorded run's stage calls ``[(stage, {input: shape})]`` -> stage ->
        total :class:`GraphFlops` (stages without a graph path are skipped)."""
        out: Dict[str, GraphFlops] = {}
        for stage, shapes in calls:
            if stage not in paths:
                continue
            out.setdefault(stage, GraphFlops())
            out[stage] += self(paths[stage], shapes)
        return out

