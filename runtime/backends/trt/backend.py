"""The TensorRT backend's runner: execution contexts per (stage, profile), named tensors,
``execute_async_v3`` on one stream, clip stores on the device, CUDA-graph replay of
``tracker_step``. Loading lives in :mod:`.loader`, buffer planning in :mod:`.buffers`,
CUDA helpers in :mod:`.cuda` (see :mod:`dvis_trt.runtime.backends.trt` for the data flow).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from dvis_trt.errors import BundleError, InputError
from dvis_trt.runtime.bundle import BundleManifest, StageSpec, with_derived_dims

from ..base import Backend, check_inputs, dtype_of
from . import loader
from .buffers import (ALIGNMENT, CLIP_STORES, DOUBLE_BUFFERED, GRAPH_STAGES, HOST_FED,
                      HOST_FETCHED, BufferPlan, GraphCache, _align, _itemsize, plan_buffers,
                      profile_max_dims)
from .cuda import DeviceTensor, _ck, _cudart, _handle, _Pinned, _trt

__all__ = ["TrtBackend"]


@dataclass
class _Bucket:
    """Execution context + buffers of one (stage, profile)."""

    context: Any
    profile: int
    device: dict[str, int]  # tensor -> device ptr (own buffers)
    pinned: dict[str, list[_Pinned]]
    flip: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class TrtBackend(Backend):
    """Runs a bundle's TensorRT engines (see the module docstring for the data flow).

    engine_dir: a built engine folder; default: ``BUNDLE/engines/<this GPU/TRT/precision>``.
    plugin_library: our MSDA plugin library (needed for ``--msda plugin`` bundles); default:
    the path recorded at build time. cuda_graphs: replay tracker_step from CUDA graphs.
    Raises :class:`DependencyError` without tensorrt / cuda-python, :class:`BundleError` for a
    missing or stale engine (one line: what it was built for, what this machine is, and
    ``run `dvis-trt build BUNDLE```).
    """

    name = "trt"
    device_resident = True

    def __init__(self, engine_dir: str | Path | None = None, *,
                 plugin_library: str | Path | None = None, device: int = 0,
                 cuda_graphs: bool = True, graph_capacity: int = 64):
        self._trt = _trt()
        self._cudart = _cudart()
        self._engine_dir = Path(engine_dir) if engine_dir else None
        self._plugin_library = Path(plugin_library) if plugin_library else None
        self._device = device
        self._cuda_graphs = cuda_graphs
        self._graphs = GraphCache(graph_capacity)
        self._engines: dict[str, Any] = {}
        self._profiles: dict[str, list] = {}
        self._buckets: dict[tuple[str, int], _Bucket] = {}
        self._specs: dict[str, StageSpec] = {}
        self._stores: dict[str, DeviceTensor] = {}
        self._store_frames = 0
        self._allocs: list[int] = []
        self._emanifest = None
        self._runtime = None
        self._plan: BufferPlan | None = None
        self._gather_bufs: dict[tuple, int] = {}
        self._scratch = 0
        self._scratch_size = 0
        self._clip_hw = (0, 0)
        _ck(self._cudart.cudaSetDevice(device), "cudaSetDevice")
        self._stream = _ck(self._cudart.cudaStreamCreateWithFlags(
            self._cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)

    # -- loading ------------------------------------------------------------------------------
    def _init_runtime(self, manifest: BundleManifest) -> None:
        trt = self._trt
        em = loader.load_engine_folder(manifest, engine_dir=self._engine_dir,
                                       plugin_library=self._plugin_library, device=self._device)
        trt.init_libnvinfer_plugins(self._logger, "")  # built-in plugins (trt-builtin MSDA)
        self._runtime = trt.Runtime(self._logger)
        self._emanifest = em

    def load_stage(self, stage_name: str, manifest: BundleManifest) -> None:
        if stage_name in self._engines:
            return
        if self._runtime is None:
            self._init_runtime(manifest)
        em = self._emanifest
        spec = manifest.stage(stage_name)
        engine = loader.deserialize_engine(self._runtime, em, stage_name, manifest)
        se = em.stages[stage_name]
        self._engines[stage_name] = engine
        self._profiles[stage_name] = list(se.profiles)
        self._specs[stage_name] = spec
        if self._plan is None and len(self._engines) == 1:
            limits = {s: profile_max_dims(p.profiles) for s, p in em.stages.items()}
            self._plan = plan_buffers({s: manifest.stage(s) for s in em.stages
                                       if s in manifest.stages}, limits)
            self._store_frames = limits.get("refiner", {}).get("L", 0) or \
                limits.get("segmenter", {}).get("T", 1)

    @property
    def loaded_stages(self) -> tuple[str, ...]:
        return tuple(self._engines)

    # -- memory -------------------------------------------------------------------------------
    def _malloc(self, nbytes: int) -> int:
        ptr = _handle(_ck(self._cudart.cudaMalloc(max(nbytes, ALIGNMENT)), "cudaMalloc"))
        self._allocs.append(ptr)
        return ptr

    def _bucket(self, stage: str, profile: int) -> _Bucket:
        key = (stage, profile)
        b = self._buckets.get(key)
        if b is not None:
            return b
        trt = self._trt
        engine = self._engines[stage]
        # one scratch (activation) buffer shared by every context: they all run in order on
        # one stream, so TensorRT's per-context device memory need not be duplicated
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise RuntimeError(f"TensorRT could not create an execution context for '{stage}' "
                               "(out of GPU memory?)")
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):
            need = int(engine.get_device_memory_size_for_profile_v2(profile))
        else:  # TensorRT 10.0
            need = int(engine.device_memory_size)
        self._ensure_scratch(need)
        self._set_scratch(ctx)
        ctx.set_optimization_profile_async(profile, _handle(self._stream))
        spec = self._specs[stage]
        dims = with_derived_dims({k: r.max for k, r in
                                  self._profiles[stage][profile].dims.items()})
        device, pinned = {}, {}
        for t in (*spec.inputs, *spec.outputs):
            key2 = (stage, t.name)
            nbytes = _align(math.prod(t.resolve(dims)) * _itemsize(t.dtype))
            if key2 not in self._plan.views:
                device[t.name] = self._malloc(nbytes)
            if key2 in HOST_FETCHED or key2 in HOST_FED:
                n = 2 if key2 in DOUBLE_BUFFERED else 1
                pinned[t.name] = [_Pinned(nbytes) for _ in range(n)]
        b = _Bucket(ctx, profile, device, pinned)
        self._buckets[key] = b
        return b

    def _set_scratch(self, ctx) -> None:
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self._scratch, self._scratch_size)
        else:  # TensorRT 10.0
            ctx.device_memory = self._scratch

    def _ensure_scratch(self, nbytes: int) -> None:
        """Grow the shared scratch buffer to ``nbytes``; re-point every context at the new one
        and drop the CUDA graphs (they captured the old address)."""
        if nbytes <= self._scratch_size:
            return
        cudart = self._cudart
        self.synchronize()
        if self._scratch:
            cudart.cudaFree(self._scratch)
            self._allocs.remove(self._scratch)
        self._scratch = self._malloc(_align(nbytes))
        self._scratch_size = _align(nbytes)
        for g in self._graphs.clear():
            cudart.cudaGraphExecDestroy(g)
        for b in self._buckets.values():
            self._set_scratch(b.context)

    def _device_buffer(self, b: _Bucket, stage: str, t) -> int:
        """The bucket's own device buffer for tensor ``t`` (allocated lazily, at the profile's
        max shape, for store-view inputs that were given from the host)."""
        ptr = b.device.get(t.name)
        if ptr is None:
            dims = with_derived_dims({k: r.max for k, r in
                                      self._profiles[stage][b.profile].dims.items()})
            ptr = self._malloc(_align(math.prod(t.resolve(dims)) * _itemsize(t.dtype)))
            b.device[t.name] = ptr
        return ptr

    def begin_clip(self, num_frames: int, hp: int, wp: int) -> None:
        """Allocate (once, at the engines' max sizes) the clip stores and check the clip fits.
        Call before the first segmenter window of every clip."""
        if num_frames > self._store_frames:
            raise InputError(f"clip of {num_frames} frames exceeds the engines' --max-frames "
                             f"{self._store_frames}; use a smaller --clip-frames or rebuild")
        if not self._stores:
            spec = self._specs["segmenter"]
            dims = profile_max_dims(self._profiles["segmenter"])
            for store, (_, tensor) in CLIP_STORES.items():
                t = spec.output(tensor)
                shape = (self._store_frames, *t.resolve(dims)[1:])
                ptr = self._malloc(self._plan.stores[store])
                self._stores[store] = DeviceTensor(ptr, shape, dtype_of(t.dtype), self)
        self._clip_hw = (hp // 4, wp // 4)

    def clip_store(self, name: str, start: int, stop: int) -> DeviceTensor:
        """View of frames ``[start, stop)`` of clip store ``name`` at the current clip's size
        (the store is laid out densely for the current ``h, w``)."""
        base = self._stores[name]
        if name == "mask_features":
            h, w = self._clip_hw
            shape = (self._store_frames, base.shape[1], h, w)
        else:
            shape = base.shape
        return DeviceTensor(base.ptr, shape, base.dtype, self).frames(start, stop)

    # -- running ------------------------------------------------------------------------------
    def _select(self, stage: str, shapes: Mapping[str, Sequence[int]]) -> int:
        from dvis_trt.runtime.bundle.profiles import describe_limits, select_profile  # noqa: PLC0415
        idx = select_profile(self._profiles[stage], shapes)
        if idx < 0:
            raise InputError(
                f"stage '{stage}': input shapes {dict(shapes)} are outside every optimization "
                f"profile of its engine ({describe_limits(self._profiles[stage])}); rebuild "
                "with larger limits (dvis-trt build --max-tracks/--max-frames/--resolutions)")
        return idx

    def _memcpy(self, dst: int, src: int, n: int, kind) -> None:
        _ck(self._cudart.cudaMemcpyAsync(dst, src, n, kind, self._stream), "cudaMemcpyAsync")

    def run_resident(self, stage_name: str, inputs: Mapping[str, Any],
                     fetch: Collection[str] = (), *, frame_offset: int = 0
                     ) -> dict[str, Any]:
        """Enqueue one stage. ``inputs``: numpy arrays (staged through pinned memory) or
        :class:`DeviceTensor` (bound directly, or copied device-to-device into the stage's
        fixed buffers for CUDA-graph stages). ``frame_offset``: for the segmenter, the clip
        frame its window starts at (outputs land in the clip stores there).
        Returns DeviceTensors, and numpy arrays for the names in ``fetch`` (those block).
        """
        cudart = self._cudart
        H2D = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        D2D = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        D2H = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if stage_name not in self._engines:
            raise BundleError(f"stage '{stage_name}' is not loaded; call load_stage first")
        spec = self._specs[stage_name]
        check_inputs(spec, inputs)
        shapes = {k: tuple(int(x) for x in v.shape) for k, v in inputs.items()}
        try:
            out_shapes = spec.output_shapes(shapes)
        except ValueError as exc:
            raise InputError(f"stage '{stage_name}': {exc}") from None
        prof = self._select(stage_name, shapes)
        if stage_name == "segmenter":
            _, _, hp, wp = shapes["images"]
            if not self._stores or ((hp // 4, wp // 4) != self._clip_hw and frame_offset == 0):
                self.begin_clip(self._store_frames, hp, wp)
            elif (hp // 4, wp // 4) != self._clip_hw:
                raise InputError(f"segmenter window of size {hp}x{wp} inside a clip of another "
                                 "size; call begin_clip() for each clip")
            if frame_offset + shapes["images"][0] > self._store_frames:
                raise InputError(f"frames {frame_offset}..{frame_offset + shapes['images'][0]}"
                                 f" exceed the clip store ({self._store_frames} frames, the "
                                 "engines' --max-frames); use a smaller --clip-frames")
        b = self._bucket(stage_name, prof)
        ctx = b.context
        use_graph = self._cuda_graphs and stage_name in GRAPH_STAGES
        for t in spec.inputs:
            v = inputs[t.name]
            if isinstance(v, DeviceTensor):
                if use_graph:  # graph replay needs fixed addresses: copy into own buffer
                    addr = self._device_buffer(b, stage_name, t)
                    self._memcpy(addr, v.ptr, v.nbytes, D2D)
                else:  # zero copy
                    addr = v.ptr
            else:
                arr = np.ascontiguousarray(v)
                addr = self._device_buffer(b, stage_name, t)
                if t.name in b.pinned:
                    slots = b.pinned[t.name]
                    i = b.flip.get(t.name, 0)
                    b.flip[t.name] = (i + 1) % len(slots)
                    slot = slots[i]
                    # the slot's previous H2D copy must be done before we overwrite it
                    _ck(cudart.cudaEventSynchronize(slot.event), "cudaEventSynchronize")
                    slot.view(arr.shape, arr.dtype)[...] = arr
                    self._memcpy(addr, slot.ptr, arr.nbytes, H2D)
                    _ck(cudart.cudaEventRecord(slot.event, self._stream), "cudaEventRecord")
                else:  # a device-fed input given from the host (host API): pageable copy
                    self._memcpy(addr, arr.ctypes.data, arr.nbytes, H2D)
                    _ck(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            if b.shapes.get(t.name) != shapes[t.name]:
                ctx.set_input_shape(t.name, shapes[t.name])
                b.shapes[t.name] = shapes[t.name]
            ctx.set_tensor_address(t.name, addr)
        outs: dict[str, Any] = {}
        for t in spec.outputs:
            key = (stage_name, t.name)
            if key in self._plan.views:
                store = self.clip_store(self._plan.views[key], frame_offset,
                                        frame_offset + out_shapes[t.name][0])
                addr = store.ptr
            else:
                addr = b.device[t.name]
            ctx.set_tensor_address(t.name, addr)
            outs[t.name] = DeviceTensor(addr, out_shapes[t.name], dtype_of(t.dtype), self)
        if use_graph:
            gkey = (stage_name, prof, tuple(sorted(shapes.items())))
            g = self._graphs.get(gkey)
            if g is not None:
                _ck(cudart.cudaGraphLaunch(g, self._stream), "cudaGraphLaunch")
            elif self._graphs.should_capture(gkey):
                # an uncaptured enqueue with exactly these shapes first: TensorRT may do lazy,
                # non-capturable set-up on the first enqueue after a shape change
                if not ctx.execute_async_v3(_handle(self._stream)):
                    raise RuntimeError(f"TensorRT enqueue of '{stage_name}' failed")
                mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
                _ck(cudart.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
                ok = ctx.execute_async_v3(_handle(self._stream))
                graph = _ck(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
                if not ok:
                    raise RuntimeError(f"TensorRT enqueue of '{stage_name}' failed in capture")
                gexec = _ck(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
                cudart.cudaGraphDestroy(graph)
                old = self._graphs.put(gkey, gexec)
                if old is not None:
                    cudart.cudaGraphExecDestroy(old)
                _ck(cudart.cudaGraphLaunch(gexec, self._stream), "cudaGraphLaunch")
            elif not ctx.execute_async_v3(_handle(self._stream)):
                raise RuntimeError(f"TensorRT enqueue of '{stage_name}' failed")
        elif not ctx.execute_async_v3(_handle(self._stream)):
            raise RuntimeError(f"TensorRT enqueue of '{stage_name}' failed")
        fetched = list(fetch)
        unknown = [n for n in fetched if n not in outs]
        if unknown:
            raise InputError(f"stage '{stage_name}' has no output(s) {unknown} to fetch "
                             f"(outputs: {list(outs)})")
        if fetched:
            views = []
            for name in fetched:
                dt = outs[name]
                slot = b.pinned.get(name, [None])[0]
                if slot is None or slot.nbytes < dt.nbytes:
                    if slot is not None:
                        self.synchronize()
                        slot.free()
                    slot = _Pinned(_align(dt.nbytes))
                    b.pinned[name] = [slot]
                self._memcpy(slot.ptr, dt.ptr, dt.nbytes, D2H)
                views.append((name, slot.view(dt.shape, dt.dtype)))
            _ck(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            for name, view in views:
                outs[name] = view.copy()
        return outs

    def run(self, stage_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self._specs.get(stage_name)
        if spec is None:
            raise BundleError(f"stage '{stage_name}' is not loaded; call load_stage first")
        return self.run_resident(stage_name, inputs, fetch=[t.name for t in spec.outputs])

    def gather_rows(self, src: DeviceTensor, rows: Sequence[int], t0: int, t: int
                    ) -> DeviceTensor:
        """``src[t0:t0+t, rows, :]`` as a new contiguous device tensor (one 2-D copy per row):
        the refiner's ``mask_embed`` (L, Qr, D) -> the mask head's (t, Qs, D)."""
        cudart = self._cudart
        L, qr, d = src.shape
        isz = np.dtype(src.dtype).itemsize
        if not 0 <= t0 <= t0 + t <= L or any(not 0 <= r < qr for r in rows):
            raise IndexError(f"gather_rows: frames [{t0}, {t0 + t}) / rows {list(rows)} "
                             f"outside {src.shape}")
        key = ("gather", len(rows), t)
        buf = self._gather_bufs.get(key)
        if buf is None:
            buf = self._malloc(_align(t * len(rows) * d * isz))
            self._gather_bufs[key] = buf
        for j, r in enumerate(rows):
            _ck(cudart.cudaMemcpy2DAsync(
                buf + j * d * isz, len(rows) * d * isz,
                src.ptr + (t0 * qr + r) * d * isz, qr * d * isz, d * isz, t,
                cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream),
                "cudaMemcpy2DAsync")
        return DeviceTensor(buf, (t, len(rows), d), src.dtype, self)

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        if not isinstance(value, DeviceTensor):
            return super().to_host(value)
        out = np.empty(value.shape, value.dtype)
        self._memcpy(out.ctypes.data, value.ptr, value.nbytes,
                     self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        self.synchronize()
        return out

    def synchronize(self) -> None:
        _ck(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None or getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            self.synchronize()
        except Exception:  # noqa: BLE001 - closing after an error must not raise again
            pass
        for g in self._graphs.clear():
            cudart.cudaGraphExecDestroy(g)
        for b in self._buckets.values():
            for slots in b.pinned.values():
                for s in slots:
                    s.free()
        self._buckets.clear()
        self._engines.clear()
        for ptr in self._allocs:
            cudart.cudaFree(ptr)
        self._allocs.clear()
        cudart.cudaStreamDestroy(self._stream)
