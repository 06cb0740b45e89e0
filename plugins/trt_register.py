"""Registering the TensorRT plugin library with a TensorRT plugin registry (once per process)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from dvis_trt.errors import DependencyError

from .identity import PLUGIN_NAME, PLUGIN_VERSION
from .library import require_library

__all__ = ["register_trt_plugin"]

_trt_handles: dict = {}


def register_trt_plugin(library: str | os.PathLike | None = None, registry=None, namespace: str | None = None) -> Path:
    """Register the ``DvisMSDeformAttn`` TensorRT plugin, once per process and registry.

    Call before parsing an ONNX graph that holds the node and before deserialising an engine built with it.
    library: the plugin library (default :func:`require_library` ("trt")); registry: a ``tensorrt.IPluginRegistry``
    (default ``tensorrt.get_plugin_registry()``, the process-wide one); namespace: plugin namespace to use
    (default ``$DVIS_TRT_PLUGIN_NAMESPACE`` or ""; fixed at the library's first registration).
    Uses ``registry.load_library`` (the library's getCreators entry point). Returns the library path.
    Raises :class:`DependencyError` without tensorrt or the library, or when TensorRT refuses it.
    """
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DependencyError("registering the TensorRT plugin needs the tensorrt Python package") from e
    path = Path(library).expanduser().resolve() if library is not None else require_library("trt").resolve()
    if not path.is_file():
        raise DependencyError(f"TensorRT plugin library {path} does not exist; run `dvis-trt build-plugins`")
    reg = registry if registry is not None else trt.get_plugin_registry()
    key = (str(path), id(reg))
    if key in _trt_handles:
        return path
    lib = ctypes.CDLL(str(path))
    if namespace is not None:
        lib.dvis_msda_trt_set_namespace.argtypes = [ctypes.c_char_p]
        lib.dvis_msda_trt_set_namespace.restype = ctypes.c_int32
        if lib.dvis_msda_trt_set_namespace(namespace.encode()) != 0:
            raise DependencyError(f"the TensorRT plugin in {path} is already registered under another namespace "
                                  f"than {namespace!r} in this process")
    lib.dvis_msda_trt_plugin_info.restype = ctypes.c_char_p
    ns = (lib.dvis_msda_trt_plugin_info().decode().split(" ", 2) + [""])[2]
    get_creator = getattr(reg, "get_creator", None) or getattr(reg, "get_plugin_creator", None)
    if get_creator is not None and get_creator(PLUGIN_NAME, PLUGIN_VERSION, ns) is not None:
        _trt_handles[key] = None  # already there (e.g. DVIS_TRT_PLUGIN_AUTOREGISTER=1)
        return path
    handle = reg.load_library(str(path))
    if handle is None:
        raise DependencyError(f"TensorRT refused the plugin library {path} (see its log; a creator "
                              f"{PLUGIN_NAME} v{PLUGIN_VERSION} may already be registered from another library)")
    _trt_handles[key] = handle
    return path
