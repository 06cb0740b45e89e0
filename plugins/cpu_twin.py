"""The MSDeformAttn CPU twin called from numpy (ctypes over ``libdvis_msda_cpu``).

The math is the plugin's own (``include/dvis_msda/msda_math.h``, shared with the CUDA kernel); this module only
checks the arguments, hands the buffers over and raises clear errors. No torch, no onnxruntime.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from dvis_trt.errors import DependencyError

__all__ = ["load_cpu_library", "msda_forward_cpu"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None

_i64 = ctypes.c_int64
_i32 = ctypes.c_int32
_vp = ctypes.c_void_p


def load_cpu_library(path: str | Path | None = None) -> ctypes.CDLL:
    """Load (once per process) the CPU twin library and check its ABI version.

    path: explicit library file; default :func:`dvis_trt.plugins.ensure_library` ("cpu"), which builds it into
    the user cache when it is missing. Raises :class:`DependencyError` when it cannot be found, built or loaded,
    or reports another ABI version (rebuild with ``dvis-trt build-plugins``).
    """
    global _lib, _lib_path
    with _lock:
        if _lib is not None and (path is None or Path(path).resolve() == _lib_path):
            return _lib
        from dvis_trt.plugins import ABI_VERSION, ensure_library

        p = Path(path).expanduser().resolve() if path is not None else ensure_library("cpu").resolve()
        try:
            lib = ctypes.CDLL(str(p))
        except OSError as e:
            raise DependencyError(f"cannot load MSDeformAttn CPU twin {p}: {e}; rebuild with `dvis-trt build-plugins`")
        try:
            abi = lib.dvis_msda_cpu_abi_version()
        except AttributeError:
            raise DependencyError(f"{p} is not a dvis-trt CPU twin library (no dvis_msda_cpu_abi_version)")
        if abi != ABI_VERSION:
            raise DependencyError(
                f"{p} has ABI version {abi}, this dvis-trt expects {ABI_VERSION}: rebuild with `dvis-trt build-plugins`"
            )
        lib.dvis_msda_cpu_forward_f32.restype = _i32
        lib.dvis_msda_cpu_forward_f32.argtypes = [_vp, _vp, _vp, _i32, _vp, _vp, _vp,
                                                  _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i32]
        lib.dvis_msda_cpu_last_error.restype = ctypes.c_char_p
        lib.dvis_msda_cpu_last_error.argtypes = []
        _lib, _lib_path = lib, p
        return lib


def _as_f32(name: str, x, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise ValueError(f"MSDeformAttn: {name} must be a float array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"MSDeformAttn: {name} must be {ndim}-D, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_index(name: str, x, shape_tail: tuple) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise ValueError(f"MSDeformAttn: {name} must be an integer array (int32/int64), got dtype {a.dtype}")
    if a.ndim != 1 + len(shape_tail) or tuple(a.shape[1:]) != shape_tail:
        want = "(L, 2)" if shape_tail else "(L,)"
        raise ValueError(f"MSDeformAttn: {name} must have shape {want}, got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def msda_forward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *,
                     out: np.ndarray | None = None, num_threads: int = 0) -> np.ndarray:
    """Multi-scale deformable attention forward on the CPU, float32.

    Semantics of the official ``ms_deform_attn_core_pytorch`` (mask2former/modeling/pixel_decoder/ops/functions/
    ms_deform_attn_func.py): bilinear sampling with zero padding and ``align_corners=False`` at
    ``x = loc_x * w - 0.5``, ``y = loc_y * h - 0.5`` of each level, weighted by the attention weights and summed
    over levels and points; level ``l`` is rows ``level_start_index[l] : + h*w`` of ``value``.

    value: (N, S, M, D) float; spatial_shapes: (L, 2) int32/int64 [h, w]; level_start_index: (L,) int;
    sampling_locations: (N, Lq, M, L, P, 2) float, (x, y) normalised to [0, 1] (outside contributes zero);
    attention_weights: (N, Lq, M, L, P) float. Float inputs are converted to float32.
    out: optional preallocated C-contiguous float32 (N, Lq, M*D) array; num_threads: <= 0 for all cores.
    Returns the (N, Lq, M*D) float32 output.
    Raises ValueError for inconsistent shapes / dtypes or a level that does not fit in S;
    :class:`DependencyError` when the library is missing and cannot be built.
    """
    v = _as_f32("value", value, 4)
    loc = _as_f32("sampling_locations", sampling_locations, 6)
    attn = _as_f32("attention_weights", attention_weights, 5)
    shapes = _as_index("spatial_shapes", spatial_shapes, (2,))
    starts = _as_index("level_start_index", level_start_index, ())
    N, S, M, D = v.shape
    L = shapes.shape[0]
    if starts.shape[0] != L:
        raise ValueError(f"MSDeformAttn: level_start_index has {starts.shape[0]} levels, spatial_shapes {L}")
    n2, Lq, m2, l2, P, two = loc.shape
    if two != 2 or n2 != N or m2 != M or l2 != L:
        raise ValueError(
            f"MSDeformAttn: sampling_locations shape {loc.shape} does not match (N={N}, Lq, M={M}, L={L}, P, 2) "
            f"of value {v.shape} / spatial_shapes {shapes.shape}"
        )
    if attn.shape != (N, Lq, M, L, P):
        raise ValueError(f"MSDeformAttn: attention_weights shape {attn.shape} != (N, Lq, M, L, P) = {(N, Lq, M, L, P)}")
    if out is None:
        out = np.empty((N, Lq, M * D), dtype=np.float32)
    elif out.shape != (N, Lq, M * D) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"MSDeformAttn: out must be a C-contiguous float32 array of shape {(N, Lq, M * D)}")
    lib = load_cpu_library()
    rc = lib.dvis_msda_cpu_forward_f32(
        v.ctypes.data, shapes.ctypes.data, starts.ctypes.data, 1, loc.ctypes.data, attn.ctypes.data,
        out.ctypes.data, N, S, M, D, L, Lq, P, int(num_threads))
    if rc != 0:
        msg = lib.dvis_msda_cpu_last_error().decode(errors="replace")
        raise ValueError(f"MSDeformAttn: {msg}")
    return out
