"""Precision of the exported graphs (``dvis-trt export --precision fp32|fp16|bf16``).

TensorRT 11 builds every network strongly typed (the builder's FP16/BF16 flags are gone; TRT 10
does so when asked): what runs in which precision is what the ONNX graph's dtypes say. So mixed
precision is decided here, at export, by converting the fp32 stage graphs with a maintained
converter and keeping the numerically fragile parts in fp32 — the known failure modes of
half-precision DETR-style engines:

* normalisations: ``LayerNormalization`` (and Group/Instance norm), ``Pow``/``Sqrt`` of
  decomposed norms;
* ``Softmax`` / ``LogSoftmax`` and every ``Reduce*`` (sums over 10^4+ pixels overflow fp16,
  lose bits in bf16), ``CumSum``;
* the attention logits: the ``MatMul`` producing the input of a ``Softmax`` and the
  scale / mask-bias arithmetic between them (masked attention adds a large negative bias;
  the tracker's slot attention is scaled dot-product similarity + softmax + renormalisation);
* divisions by a reduction (mask pooling ``sum / (count + 1e-8)``, slot-attention
  renormalisation, L2 normalisations);
* MSDA sampling: ``GridSample`` and our ``DvisMSDeformAttn`` / TensorRT's
  ``MultiscaleDeformableAttnPlugin_TRT`` nodes, and every node that computes their sampling
  locations (reference points + offsets / normaliser, ``2*loc-1``) back to the offsets'
  ``MatMul``: a half-precision coordinate at 200 px is off by up to 1/8 px (fp16) or 1 px (bf16).

Which converter, and why:

* **fp16: ONNX Runtime's float16 converter** (``onnxruntime.transformers.float16``). It ships
  inside the ``onnxruntime`` wheel the runtime already depends on, so it installs wherever
  dvis-trt does (this machine and CI included); it is maintained in the ONNX Runtime repository
  (the successor of ``onnxconverter-common``'s converter, with later fixes such as opset-aware
  ``Resize`` handling); it takes op-type *and* node-name block lists and ``keep_io_types``,
  which is all we need. It appends its Cast nodes at the end of the graph, so we topologically
  sort afterwards (the TensorRT ONNX parser wants sorted nodes).
* **bf16: NVIDIA ModelOpt AutoCast** (``modelopt.onnx.autocast.convert_to_mixed_precision``),
  the only maintained converter that targets bf16 (and strongly typed TensorRT). It is
  optional — ``pip install nvidia-modelopt onnx-graphsurgeon onnxslim lief`` (not the ``[onnx]``
  extra, which pins onnx ~=1.21 and onnxruntime-gpu and would replace the runtime's
  onnxruntime) — and it needs torch, which the export install has. It raises the opset to 22
  (bf16 support). For graphs with custom ops (``--msda plugin``) AutoCast runs a TensorRT
  reference, so convert those on the GPU machine. ``converter="modelopt"`` also works for fp16.

Graph inputs and outputs stay float32 (``keep_io_types``) in every precision, so the manifest's
stage contracts and the runtime do not change with precision.
"""
from __future__ import annotations

import collections
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from dvis_trt.errors import DependencyError, InputError
from dvis_trt.fileio import atomic_output
from dvis_trt.plugins import identity

__all__ = ["KEEP_FP32_OP_TYPES", "MSDA_OP_TYPES", "PrecisionReport", "kept_fp32_nodes",
           "convert_precision", "convert_file", "topological_sort", "ensure_node_names",
           "available_converters"]

#: MSDA custom ops (our plugin; TensorRT's built-in one) and their sampling-locations input.
MSDA_OP_TYPES = {op: 3 for op in identity.MSDA_OP_TYPES}

_REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
               "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}

#: Op types always kept in fp32.
KEEP_FP32_OP_TYPES = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "Softmax", "LogSoftmax", "CumSum", "Pow", "Sqrt",
    "GridSample", *MSDA_OP_TYPES, *_REDUCE_OPS,
})

_MATMUL_OPS = {"MatMul", "Gemm", "Einsum", "Conv"}
# ops between an attention MatMul and its Softmax (scale, mask bias, head reshapes)
_LOGIT_CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Reshape", "Transpose", "Cast",
                    "Unsqueeze", "Squeeze", "Expand", "Identity", "Flatten", "Neg", "Clip",
                    "Max", "Min", "Concat"}
# where the walk back from MSDA sampling locations stops (the offsets' Linear, or anything that
# starts another block)
_MSDA_STOP_OPS = _MATMUL_OPS | {"LayerNormalization", "GroupNormalization", "Softmax",
                                "GridSample", *MSDA_OP_TYPES}
# ops between a reduction and the division it normalises
_NORM_DIVISOR_OPS = {"Add", "Clip", "Max", "Sqrt", "Unsqueeze", "Expand", "Cast", "Reshape",
                     "Identity"}


@dataclass
class PrecisionReport:
    """What a conversion did: target precision, converter, and the nodes kept in fp32 with the
    rule that kept each (``op-type``, ``attention-logits``, ``msda-coordinates``,
    ``normalising-division``)."""

    precision: str
    converter: str
    num_nodes_before: int
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        by = collections.Counter(self.kept.values())
        rules = ", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none"
        return (f"{self.precision} via {self.converter}: {len(self.kept)} of "
                f"{self.num_nodes_before} nodes kept fp32 ({rules})")


def _onnx():
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        raise DependencyError("precision conversion needs the 'onnx' package; "
                              "pip install 'dvis-trt[export]'") from None
    return onnx


def ensure_node_names(model) -> None:
    """Give every unnamed node a unique name (``<op_type>_<index>``): block lists are by name."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs
    (Kahn's algorithm, stable: keeps the original order where it is already valid).
    Raises ``ValueError`` on a cycle."""
    nodes = list(graph.node)
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
    deps = [set() for _ in nodes]
    users = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for x in n.input:
            j = producer.get(x)
            if j is not None and j != i and j not in deps[i]:
                deps[i].add(j)
                users[j].append(i)
    import heapq  # noqa: PLC0415
    ready = [i for i in range(len(nodes)) if not deps[i]]
    heapq.heapify(ready)
    order = []
    indeg = [len(d) for d in deps]
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle; cannot sort it")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def kept_fp32_nodes(model, extra_op_types: Iterable[str] = (),
                    extra_node_patterns: Iterable[str] = ()) -> dict[str, str]:
    """Names of the nodes that must stay fp32, each with the rule that keeps it (see the module
    docstring). Nodes must be named (:func:`ensure_node_names`). ``extra_node_patterns`` are
    regular expressions matched (``re.search``) against node names."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output if o}
    keep_ops = KEEP_FP32_OP_TYPES | set(extra_op_types)
    kept: dict[str, str] = {}

    def mark(n, why):
        kept.setdefault(n.name, why)

    def walk_back(start_tensor, allowed, stop_ops, why, max_depth):
        stack = [(start_tensor, 0)]
        seen = set()
        while stack:
            t, depth = stack.pop()
            n = producer.get(t)
            if n is None or n.name in seen or depth > max_depth:
                continue
            seen.add(n.name)
            if n.op_type in stop_ops:
                mark(n, why)
                continue
            if n.op_type not in allowed:
                continue
            mark(n, why)
            ins = n.input[1:] if n.op_type == "Where" else n.input
            stack.extend((x, depth + 1) for x in ins if x)

    for n in nodes:
        if n.op_type in keep_ops:
            mark(n, "op-type")
    for n in nodes:
        if n.op_type == "Softmax" and n.input:
            walk_back(n.input[0], _LOGIT_CHAIN_OPS, _MATMUL_OPS, "attention-logits", 8)
        elif n.op_type in MSDA_OP_TYPES and len(n.input) > MSDA_OP_TYPES[n.op_type]:
            walk_back(n.input[MSDA_OP_TYPES[n.op_type]], _ALL_OPS, _MSDA_STOP_OPS,
                      "msda-coordinates", 16)
        elif n.op_type == "GridSample" and len(n.input) > 1:
            walk_back(n.input[1], _ALL_OPS, _MSDA_STOP_OPS, "msda-coordinates", 16)
        elif n.op_type == "Div" and len(n.input) > 1:
            # a division whose divisor comes (through eps/clamp/broadcast) from a reduction
            t, depth = n.input[1], 0
            chain = []
            while depth < 4:
                p = producer.get(t)
                if p is None:
                    break
                if p.op_type in _REDUCE_OPS:
                    mark(n, "normalising-division")
                    for c in chain:
                        mark(c, "normalising-division")
                    break
                if p.op_type not in _NORM_DIVISOR_OPS or not p.input:
                    break
                chain.append(p)
                t, depth = p.input[0], depth + 1
    patterns = [re.compile(p) for p in extra_node_patterns]
    for n in nodes:
        if any(p.search(n.name) for p in patterns):
            mark(n, "user")
    return kept


class _AllOps:
    def __contains__(self, item):
        return True


_ALL_OPS = _AllOps()


def available_converters() -> dict[str, bool]:
    """Which converters import here: ``{"ort": bool, "modelopt": bool}``."""
    out = {}
    try:
        from onnxruntime.transformers import float16  # noqa: F401, PLC0415
        out["ort"] = True
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        out["ort"] = False
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision  # noqa: F401, PLC0415
        out["modelopt"] = True
    except Exception:  # noqa: BLE001
        out["modelopt"] = False
    return out


def _type_custom_outputs(model) -> None:
    """Shape-infer, then declare float32 outputs for custom-domain nodes ONNX cannot infer (the
    MSDA plugin nodes), so the converter inserts Casts around them correctly."""
    onnx = _onnx()
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(inferred.graph.value_info)
    typed = {v.name for v in model.graph.value_info} | {v.name for v in model.graph.input} \
        | {v.name for v in model.graph.output} | {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") and n.op_type in MSDA_OP_TYPES:
            for o in n.output:
                if o and o not in typed:
                    model.graph.value_info.append(
                        onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None))


def _convert_ort(model, keep: Mapping[str, str], extra_op_types):
    from onnxruntime.transformers import float16 as ort_fp16  # noqa: PLC0415
    _type_custom_outputs(model)
    op_block = set(ort_fp16.DEFAULT_OP_BLOCK_LIST) | KEEP_FP32_OP_TYPES | set(extra_op_types)
    return ort_fp16.convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True, op_block_list=sorted(op_block),
        node_block_list=sorted(keep))


def _convert_modelopt(model, precision, keep: Mapping[str, str], extra_op_types,
                      trt_plugins=()):
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        raise DependencyError(
            f"--precision {precision} needs NVIDIA ModelOpt AutoCast ({exc}); pip install "
            "nvidia-modelopt onnx-graphsurgeon onnxslim lief (not the [onnx] extra: it pins "
            "onnx/onnxruntime versions)") from None
    import numpy as np  # noqa: PLC0415
    onnx = _onnx()
    with tempfile.TemporaryDirectory(prefix="dvis_prec_") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path)
        return convert_to_mixed_precision(
            path, low_precision_type=precision,
            nodes_to_exclude=[f"^{re.escape(n)}$" for n in sorted(keep)],
            op_types_to_exclude=sorted(KEEP_FP32_OP_TYPES | set(extra_op_types)),
            keep_io_types=True, data_max=np.inf, init_max=np.inf,
            trt_plugins=list(trt_plugins))


def convert_precision(model, precision: str, *, converter: str = "auto",
                      extra_op_types: Iterable[str] = (),
                      extra_node_patterns: Iterable[str] = (),
                      trt_plugins: Iterable[str] = ()):
    """Convert an fp32 ``onnx.ModelProto`` to ``precision`` (``fp32`` | ``fp16`` | ``bf16``).

    ``converter``: ``"auto"`` (fp16 -> ``"ort"``, bf16 -> ``"modelopt"``), ``"ort"`` (fp16
    only) or ``"modelopt"``. The kept-fp32 nodes come from :func:`kept_fp32_nodes`; graph I/O
    stays float32. The input model is not modified. Returns ``(model, PrecisionReport)``; the
    result is topologically sorted and passes ``onnx.checker``.
    Raises :class:`InputError` for a bad precision/converter pair, :class:`DependencyError`
    when the converter is not installed.
    """
    onnx = _onnx()
    if precision not in ("fp32", "fp16", "bf16"):
        raise InputError(f"--precision {precision!r} is not fp32, fp16 or bf16")
    if converter == "auto":
        converter = {"fp32": "none", "fp16": "ort", "bf16": "modelopt"}[precision]
    if precision == "bf16" and converter == "ort":
        raise InputError("ONNX Runtime's converter makes fp16 only; use converter 'modelopt' "
                         "for bf16")
    if converter not in ("none", "ort", "modelopt"):
        raise InputError(f"unknown precision converter {converter!r} (ort, modelopt)")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    ensure_node_names(work)
    report = PrecisionReport(precision, converter if precision != "fp32" else "none",
                             len(work.graph.node))
    if precision == "fp32":
        return work, report
    keep = kept_fp32_nodes(work, extra_op_types, extra_node_patterns)
    report.kept = dict(keep)
    if converter == "ort":
        try:
            from onnxruntime.transformers import float16  # noqa: F401, PLC0415
        except Exception as exc:  # noqa: BLE001
            raise DependencyError(f"fp16 conversion needs onnxruntime's float16 converter "
                                  f"({exc}); pip install onnxruntime") from None
        out = _convert_ort(work, keep, extra_op_types)
    else:
        out = _convert_modelopt(work, precision, keep, extra_op_types, trt_plugins)
    topological_sort(out.graph)
    onnx.checker.check_model(out)
    return out, report


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, precision: str,
                 **kwargs) -> PrecisionReport:
    """:func:`convert_precision` from file ``src`` to file ``dst`` (written atomically; models
    over 2 GB are saved with external data next to ``dst``)."""
    onnx = _onnx()
    model = onnx.load(str(src))
    out, report = convert_precision(model, precision, **kwargs)
    dst = Path(dst)
    large = out.ByteSize() > 2_000_000_000
    with atomic_output(dst) as tmp:
        onnx.save(out, str(tmp), save_as_external_data=large,
                  location=dst.name + ".data" if large else None)
    return report
