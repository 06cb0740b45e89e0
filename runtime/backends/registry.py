"""The one backend registry: ``create_backend(name, bundle, **options)``.

``dvis-trt run``, ``dvis-trt check`` and ``dvis-trt bench`` all create their backends here.
Each backend module is imported only when its backend is created, so an edge install (no
torch, no TensorRT) imports this module and runs ``ort``.

Names (:data:`BACKENDS`):

- ``auto``: TensorRT when ``tensorrt`` imports and engines built for this GPU / TensorRT
  version exist in the bundle; else ONNX Runtime (CUDA provider when this onnxruntime has it,
  else CPU). ``torch`` is never chosen automatically (it needs the checkpoint).
- ``ort``: :class:`~dvis_trt.runtime.backends.ort_backend.OrtBackend`; options ``providers``
  (``"auto"``, ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or a list), ``threads``,
  ``optimization``, ``plugin_library``.
- ``trt``: :class:`~dvis_trt.runtime.backends.trt.TrtBackend`; options ``engine_dir``,
  ``plugin_library``, ``device`` (int), ``cuda_graphs``.
- ``torch``: :class:`~dvis_trt.runtime.backends.torch_backend.TorchBackend` (eager stages, the
  baseline; needs ``model`` or ``checkpoint``); options ``model``, ``checkpoint``,
  ``config_file``, ``overrides``, ``device`` (str), ``threads``, ``allow_unsafe_pickle``,
  ``autocast`` (``"fp16"``), ``compile``.

Options a backend does not take are dropped for it when they are ``None`` (so callers can pass
their whole option set), and refused otherwise.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, Optional, Union

from dvis_trt.errors import DvisTrtError, InputError

from ..bundle import BundleManifest, load_manifest
from .base import Backend

__all__ = ["BACKENDS", "create_backend", "describe_backend"]

#: name -> one-line description (``--backend`` choices of run / check).
BACKENDS: Dict[str, str] = {
    "auto": "TensorRT engines built for this machine if present, else ONNX Runtime",
    "ort": "ONNX Runtime (CPU; CUDA / TensorRT execution providers where installed)",
    "trt": "our TensorRT engines (dvis-trt build), tensors resident on the GPU",
    "torch": "eager PyTorch stages (the baseline; needs the checkpoint)",
}


def _ort_class():
    from .ort_backend import OrtBackend
    return OrtBackend


def _trt_class():
    from .trt import TrtBackend
    return TrtBackend


def _torch_class():
    from .torch_backend import TorchBackend
    return TorchBackend


_CLASSES: Dict[str, Callable[[], type]] = {"ort": _ort_class, "trt": _trt_class,
                                           "torch": _torch_class}


def describe_backend(backend: Any) -> str:
    """One line naming a loaded backend and what it runs on (for logs and summaries)."""
    name = getattr(backend, "name", type(backend).__name__)
    if name == "ort":
        active = getattr(backend, "active_providers", {}) or {}
        order = list(getattr(backend, "providers", []))
        providers = sorted({p for ps in active.values() for p in ps},
                           key=lambda p: order.index(p) if p in order else 9)
        threads = f", {backend.threads} threads" if getattr(backend, "threads", None) else ""
        return f"ort (ONNX Runtime: {', '.join(providers) or 'no session'}{threads})"
    if name == "trt":
        em = getattr(backend, "_emanifest", None)
        where = f" {em.root.name}" if em is not None and getattr(em, "root", None) else ""
        return f"trt (TensorRT engines{where})"
    if name == "torch":
        threads = getattr(backend, "threads", None)
        return f"torch (eager PyTorch, CPU{f', {threads} threads' if threads else ''})"
    return str(name)


def _instantiate(name: str, options: Dict[str, Any],
                 manifest: Optional[BundleManifest] = None) -> Backend:
    cls = _CLASSES[name]()
    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    for key, value in options.items():
        if key in params:
            kwargs[key] = value
        elif value is not None:
            raise InputError(f"backend '{name}' takes no option '{key}'")
    if name == "torch" and kwargs.get("model") is None and kwargs.get("checkpoint") is None \
            and manifest is not None:  # (without a bundle the backend asks at load time)
        from ..provenance import recorded_checkpoint  # the one the bundle records (sha256)
        kwargs["checkpoint"] = recorded_checkpoint(manifest,
                                                   needed_for="--backend torch (eager PyTorch)")
    return cls(**kwargs)


def _load(backend: Backend, manifest: Optional[BundleManifest]) -> Backend:
    if manifest is not None:
        try:
            backend.load_all(manifest)
        except BaseException:
            backend.close()
            raise
    backend.description = describe_backend(backend)
    return backend


def _auto(manifest: Optional[BundleManifest], options: Dict[str, Any]) -> Backend:
    why_not_trt = None
    engines = manifest.root / "engines" if manifest is not None and manifest.root else None
    if engines is None or not engines.is_dir():
        why_not_trt = "no TensorRT engines in the bundle (`dvis-trt build` makes them)"
    else:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            why_not_trt = "tensorrt is not installed"
    if why_not_trt is None:
        try:
            trt_opts = {k: v for k, v in options.items()
                        if k in ("engine_dir", "plugin_library")}
            return _load(_instantiate("trt", trt_opts), manifest)
        except DvisTrtError as exc:
            why_not_trt = str(exc)
        except Exception as exc:  # a CUDA / driver failure: fall back, say why
            why_not_trt = f"{type(exc).__name__}: {exc}"
    ort_opts = {k: v for k, v in options.items()
                if k in ("providers", "threads", "optimization", "plugin_library")}
    ort_opts["providers"] = ort_opts.get("providers") or "auto"
    backend = _load(_instantiate("ort", ort_opts), manifest)
    backend.description = f"{backend.description} [auto; not TensorRT: {why_not_trt}]"
    return backend


def create_backend(name: str, bundle: Union[BundleManifest, str, os.PathLike, None] = None,
                   **options: Any) -> Backend:
    """Create backend ``name`` of :data:`BACKENDS`; with a bundle, load every stage of it.

    Args:
        name: ``auto``, ``ort``, ``trt`` or ``torch``.
        bundle: a loaded :class:`BundleManifest`, a bundle folder, or ``None`` (the caller
            loads stages itself).
        options: the backend's constructor options (see the module docstring).
    Returns:
        The backend; ``backend.description`` is one line for logs (for ``auto`` it says why
        TensorRT was not used).
    Raises:
        InputError: unknown name or option, ``torch`` without weights; DependencyError: the
        backend's package is missing; BundleError: the bundle (or its engines) cannot be loaded.
    """
    if name not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    manifest = bundle if isinstance(bundle, BundleManifest) or bundle is None \
        else load_manifest(bundle)
    if name == "auto":
        return _auto(manifest, options)
    if name == "ort":
        options = dict(options)
        options["providers"] = options.get("providers") or "auto"
    return _load(_instantiate(name, options, manifest), manifest)
