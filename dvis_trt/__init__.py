"""dvis-trt: deployment-optimized inference for DVIS-DAQ offline.

One import namespace over the project's folders: ``dvis_trt.runtime`` (``runtime/``),
``dvis_trt.export`` (``export/``), ``dvis_trt.engine`` (``engine/``),
``dvis_trt.benchmarks`` (``benchmarks/``) and ``dvis_trt.plugins`` (``plugins/``).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``dvis_trt.stream(bundle, source, ...)``: per-frame results over a live source (the
    runtime's :func:`dvis_trt.runtime.stream.stream`), imported on first use so that importing
    ``dvis_trt`` stays free of numpy / PyAV / ONNX Runtime."""
    if name == "stream":
        import importlib

        return importlib.import_module("dvis_trt.runtime.stream").stream
    raise AttributeError(f"module 'dvis_trt' has no attribute {name!r}")
