"""dvis-trt's MSDeformAttn plugin: finding, building and calling its native libraries.

Three shared libraries are built from the C++/CUDA sources in this folder (``CMakeLists.txt``):

=========  ====================  ==========================================================================
kind       file (Linux)          what
=========  ====================  ==========================================================================
``cpu``    libdvis_msda_cpu.so   CPU twin (fp32), the ONNX Runtime custom op behind ``--msda plugin`` bundles
``cuda``   libdvis_msda_cuda.so  the CUDA kernel with a C entry point (benchmarks, tests)
``trt``    libdvis_msda_trt.so   the TensorRT IPluginV3 plugin ``DvisMSDeformAttn`` version ``1``
=========  ====================  ==========================================================================

:func:`find_library` looks, in this order, in every folder of ``$DVIS_TRT_PLUGIN_DIR``
(``os.pathsep``-separated), in this package's folder, in ``<repo>/build/plugins`` (a source checkout
built with ``cmake -S . -B build``) and in the user cache folder that :func:`build` writes to
(``$DVIS_TRT_CACHE_DIR`` or ``$XDG_CACHE_HOME/dvis_trt`` or ``~/.cache/dvis_trt``, then
``plugins/<source hash>``). :func:`build` runs CMake; ``dvis-trt build-plugins`` is its command line.

:func:`register_trt_plugin` registers the TensorRT plugin (``IPluginRegistry.load_library``); call it before
parsing or deserialising. :mod:`dvis_trt.plugins.ort_op` wires the CPU twin into ONNX Runtime and
:mod:`dvis_trt.plugins.cpu_twin` calls it on numpy arrays. Nothing here imports torch, tensorrt or onnxruntime
at import time.
"""
from __future__ import annotations

from .identity import (ABI_VERSION, MSDA_OP_TYPES, ONNX_DOMAIN, ONNX_OP_TYPE, PLUGIN_NAME,
                       PLUGIN_NAMESPACE, PLUGIN_VERSION, TRT_BUILTIN_PLUGIN)
from .library import (KINDS, BuildResult, build, cache_dir, ensure_library, find_library,
                      library_filename, repo_build_dir, require_library, search_dirs, source_dir,
                      source_hash)
from .trt_register import register_trt_plugin

__all__ = [
    "PLUGIN_NAME", "PLUGIN_VERSION", "PLUGIN_NAMESPACE", "ONNX_DOMAIN", "ONNX_OP_TYPE",
    "TRT_BUILTIN_PLUGIN", "MSDA_OP_TYPES", "ABI_VERSION", "KINDS", "BuildResult",
    "library_filename", "source_dir", "source_hash", "cache_dir", "repo_build_dir",
    "search_dirs", "find_library", "require_library", "build", "ensure_library",
    "msda_forward_cpu", "register_trt_plugin",
]


def msda_forward_cpu(*args, **kwargs):
    """Run the CPU twin on numpy arrays; see :func:`dvis_trt.plugins.cpu_twin.msda_forward_cpu`."""
    from dvis_trt.plugins.cpu_twin import msda_forward_cpu as _fwd

    return _fwd(*args, **kwargs)


