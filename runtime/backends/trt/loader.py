"""Loading a bundle's TensorRT engines: this machine's identity, the engine folder for it
(staleness rules in :mod:`dvis_trt.runtime.bundle.engines`), the MSDA plugin library, and
deserialisation. Shaped like Polygraphy's ``backend/trt`` loaders; no GPU needed to import.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dvis_trt.errors import BundleError, DependencyError
from dvis_trt.fileio import sha256_file
from dvis_trt.runtime.bundle import BundleManifest
from dvis_trt.runtime.bundle.engines import (EngineManifest, MachineInfo, check_fresh,
                                             find_engine_dir, load_engine_manifest)

from .cuda import _trt

__all__ = ["machine_info", "load_engine_folder", "deserialize_engine"]


def machine_info(device: int = 0) -> MachineInfo:
    """TensorRT version and the CUDA device's name and compute capability (needs a GPU).
    Raises :class:`DependencyError` when tensorrt / cuda-python / a CUDA driver is missing."""
    trt = _trt()
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError:
        raise DependencyError("pip install cuda-python (NVIDIA's CUDA binding) to query the "
                              "GPU") from None
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise DependencyError(f"no usable CUDA GPU {device} ({err.name}); TensorRT engines "
                              "need an NVIDIA GPU and driver")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return MachineInfo(trt.__version__, str(name).strip(), f"{prop.major}.{prop.minor}")


def load_engine_folder(manifest: BundleManifest, *, engine_dir: Path | None = None,
                       plugin_library: Path | None = None, device: int = 0) -> EngineManifest:
    """The engine manifest for ``manifest`` on this machine, checked for staleness, with the
    MSDA plugin library registered when the engines need it.

    ``engine_dir``: a built engine folder; default: ``BUNDLE/engines/<this GPU/TRT/precision>``.
    ``plugin_library``: our plugin library; default: the path recorded at build time.
    Raises :class:`BundleError` (missing / stale engines, missing plugin library) and
    :class:`DependencyError` (no TensorRT / CUDA).
    """
    machine = machine_info(device)
    folder = engine_dir or find_engine_dir(manifest, machine)
    em = load_engine_manifest(folder, verify=False)
    if em.plugin_library:
        lib = plugin_library or Path(em.plugin_library.get("path", ""))
        if not lib.is_file():
            raise BundleError(f"the engines need the MSDA plugin library "
                              f"{em.plugin_library.get('name')} but {lib} does not exist; "
                              "run `dvis-trt build-plugins` or pass --plugin-lib")
        check_fresh(em, manifest, machine, sha256_file(lib))
        from dvis_trt.plugins import register_trt_plugin
        register_trt_plugin(lib)  # registry.load_library, before deserialising
    else:
        check_fresh(em, manifest, machine, None)
    return em


def deserialize_engine(runtime: Any, em: EngineManifest, stage_name: str,
                       manifest: BundleManifest) -> Any:
    """Deserialise the ``stage_name`` engine of engine folder ``em`` with ``runtime``
    (``trt.Runtime``). Raises :class:`BundleError` when it is missing or unreadable."""
    se = em.stages.get(stage_name)
    if se is None:
        raise BundleError(f"{em.root} has no '{stage_name}' engine; run `dvis-trt build "
                          f"{manifest.root}`")
    engine = runtime.deserialize_cuda_engine((em.root / se.file).read_bytes())
    if engine is None:
        raise BundleError(f"TensorRT could not deserialize {em.root / se.file} (corrupt, or "
                          f"built by another TensorRT); run `dvis-trt build {manifest.root}`")
    return engine
