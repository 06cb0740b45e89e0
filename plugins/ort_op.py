"""Run ``dvis_trt::DvisMSDeformAttn`` nodes in ONNX Runtime through the CPU twin.

The node (what ``--msda plugin`` exports)::

    DvisMSDeformAttn(value f32 (N,S,M,D), spatial_shapes i64|i32 (L,2), level_start_index i64|i32 (L),
                     sampling_locations f32 (N,Lq,M,L,P,2), attention_weights f32 (N,Lq,M,L,P))
        -> output f32 (N,Lq,M*D)
    domain "dvis_trt", attributes plugin_version="1", plugin_namespace=""

is registered as an onnxruntime-extensions Python custom op whose body calls the compiled CPU twin
(``libdvis_msda_cpu``, the same per-sample math as the CUDA kernel). Usage::

    import onnxruntime as ort
    from dvis_trt.plugins.ort_op import session_options
    sess = ort.InferenceSession("segmenter.onnx", session_options(), providers=["CPUExecutionProvider"])

or, with options of your own, ``so = ort.SessionOptions(); ...; session_options(so)``. Sessions of graphs
without the node are unaffected by the registration. Needs the ``onnxruntime-extensions`` package (extra
``dvis-trt[plugin]``); the CPU library is built into the user cache on first use when it is missing.
"""
from __future__ import annotations

import threading

import numpy as np

from dvis_trt.errors import DependencyError

__all__ = ["register_ort_op", "session_options", "extensions_library_path", "uses_msda_plugin"]

_lock = threading.Lock()
_registered = False


class _FlatOutput(np.ndarray):
    """An output array that onnxruntime-extensions can copy without a Python list.

    onnxruntime-extensions' Python-op bridge returns ``rv.flatten().tolist()`` to its C++ side, which accepts any
    array-like there; a list of ~10^7 floats costs seconds. ``tolist()`` of this subclass hands back the flat
    array itself, so the C++ side copies the buffer instead. Should a future version call something else, the
    result is still an ndarray and stays correct.
    """

    def tolist(self):  # noqa: D102 - see class docstring
        return np.ascontiguousarray(self.view(np.ndarray)).reshape(-1)


def _import_extensions():
    try:
        import onnxruntime_extensions as ortx
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise DependencyError(
            "running --msda plugin bundles in ONNX Runtime needs onnxruntime-extensions: "
            "pip install 'dvis-trt[plugin]' (or pip install onnxruntime-extensions)"
        ) from e
    return ortx


def extensions_library_path() -> str:
    """Path of the onnxruntime-extensions custom-op library that hosts the Python op."""
    return _import_extensions().get_library_path()


def register_ort_op() -> str:
    """Register ``dvis_trt::DvisMSDeformAttn`` with onnxruntime-extensions (once per process).

    Loads (or builds) the CPU twin first, so a missing library fails here with one clear line.
    Returns the custom-op library path to pass to ``SessionOptions.register_custom_ops_library``.
    Raises :class:`DependencyError` without onnxruntime-extensions or the CPU library.
    """
    global _registered
    ortx = _import_extensions()
    from dvis_trt.plugins import ONNX_DOMAIN, ONNX_OP_TYPE, PLUGIN_VERSION
    from dvis_trt.plugins.cpu_twin import load_cpu_library, msda_forward_cpu

    with _lock:
        if not _registered:
            load_cpu_library()
            dt = ortx.PyCustomOpDef

            @ortx.onnx_op(
                op_type=f"{ONNX_DOMAIN}::{ONNX_OP_TYPE}",
                # index inputs: any element type (int64 per the node contract, int32 as TensorRT's built-in
                # plugin takes them); cpu_twin checks they are integers.
                inputs=[dt.dt_float, dt.undefined, dt.undefined, dt.dt_float, dt.dt_float],
                outputs=[dt.dt_float],
                attrs={"plugin_version": dt.dt_string, "plugin_namespace": dt.dt_string},
            )
            def _dvis_msdeformattn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   **attrs):
                version = attrs.get("plugin_version") or PLUGIN_VERSION
                if version != PLUGIN_VERSION:
                    raise ValueError(
                        f"{ONNX_DOMAIN}::{ONNX_OP_TYPE} node has plugin_version={version!r}; this dvis-trt runs "
                        f"version {PLUGIN_VERSION!r}: re-export the bundle"
                    )
                out = msda_forward_cpu(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights)
                return out.view(_FlatOutput)

            _registered = True
    return ortx.get_library_path()


def session_options(so=None):
    """SessionOptions that can run graphs holding ``dvis_trt::DvisMSDeformAttn`` nodes.

    so: an ``onnxruntime.SessionOptions`` to extend (default: a new one). Registers the op
    (:func:`register_ort_op`) and the onnxruntime-extensions library on ``so``; returns ``so``.
    Raises :class:`DependencyError` when onnxruntime, onnxruntime-extensions or the CPU library is missing.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover
        raise DependencyError("onnxruntime is not installed: pip install onnxruntime") from e
    path = register_ort_op()
    if so is None:
        so = ort.SessionOptions()
    so.register_custom_ops_library(path)
    return so


def uses_msda_plugin(model) -> bool:
    """True when an ONNX model (``onnx.ModelProto``, or a path / bytes, read with onnx) has a
    ``dvis_trt::DvisMSDeformAttn`` node (in the main graph or any subgraph)."""
    import onnx

    from dvis_trt.plugins import ONNX_DOMAIN, ONNX_OP_TYPE

    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    elif not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)

    def walk(graph):
        for node in graph.node:
            if node.domain == ONNX_DOMAIN and node.op_type == ONNX_OP_TYPE:
                return True
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH and walk(a.g):
                    return True
                if a.type == onnx.AttributeProto.GRAPHS and any(walk(g) for g in a.graphs):
                    return True
        return False

    return walk(model.graph)
