"""CUDA and TensorRT imports (lazy, one clear error each), CUDA-call checking, device tensor
views and page-locked host buffers for the TensorRT backend."""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dvis_trt.errors import DependencyError, InputError

if TYPE_CHECKING:
    from .backend import TrtBackend

__all__ = ["DeviceTensor"]


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError:
        raise DependencyError("the TensorRT backend needs NVIDIA's CUDA Python binding; "
                              "pip install cuda-python (or 'dvis-trt[engine]')") from None
    return cudart


def _trt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise DependencyError("the TensorRT backend needs TensorRT's Python package; install "
                              "TensorRT (pip install tensorrt, or JetPack on Jetson)") from None
    return trt


def _ck(result, what: str):
    """Unpack a cuda.bindings call result ``(err, *values)``; raise on error."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, msg = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error in {what}: {err.name}: {msg!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _handle(x) -> int:
    try:
        return int(x)
    except TypeError:
        return int(x.getPtr())


@dataclass
class DeviceTensor:
    """A tensor in device memory owned by a :class:`TrtBackend` (a view: never freed by itself).

    ptr: device address (int); shape, dtype: numpy semantics, C-contiguous.
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    backend: "TrtBackend | None" = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def frames(self, start: int, stop: int) -> "DeviceTensor":
        """View of ``[start:stop]`` on the leading axis (no copy)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"frames({start}, {stop}) outside leading axis {self.shape[0]}")
        row = math.prod(self.shape[1:]) * np.dtype(self.dtype).itemsize
        return DeviceTensor(self.ptr + start * row, (stop - start, *self.shape[1:]),
                            self.dtype, self.backend)

    def frame(self, i: int) -> "DeviceTensor":
        """View of element ``i`` of the leading axis, without that axis."""
        v = self.frames(i, i + 1)
        return DeviceTensor(v.ptr, v.shape[1:], v.dtype, v.backend)


class _Pinned:
    """Page-locked host buffer with a numpy view factory."""

    def __init__(self, nbytes: int):
        cudart = _cudart()
        self.nbytes = nbytes
        self.ptr = _handle(_ck(cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        self.event = _ck(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming),
                         "cudaEventCreate")

    def view(self, shape, dtype) -> np.ndarray:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        if n > self.nbytes:
            raise InputError(f"tensor of {n} bytes exceeds its planned pinned buffer "
                             f"({self.nbytes}); rebuild engines with larger limits")
        raw = (ctypes.c_byte * n).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=math.prod(shape)).reshape(shape)

    def free(self):
        cudart = _cudart()
        if self.ptr:
            cudart.cudaEventDestroy(self.event)
            cudart.cudaFreeHost(self.ptr)
            self.ptr = 0
