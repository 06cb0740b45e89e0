"""TensorRT backend: prebuilt engines (``dvis-trt build``), tensors resident on the GPU between
stages. No torch. ``tensorrt`` and ``cuda.bindings`` (NVIDIA's CUDA Python binding) are
imported only inside :class:`TrtBackend`, so this module imports — and its buffer planning is
tested — on machines without a GPU.

Data flow (one CUDA stream, everything enqueued asynchronously)::

    frames --pinned x2--> images --segmenter--> mask_features, frame_embeds: written straight
                                                into the clip stores at the window's frame offset;
                                                mask_pooled, pred_logits: window buffers
    store mask_features[i] --D2D--> tracker_step inputs --CUDA graph per tQ--> outputs
    store frame_embeds[0:L] --(zero copy)--> refiner
    refiner mask_embed --row gather (D2D)--> mask_head <--(zero copy)-- mask_features[t0:t0+t]
    to the host, via pinned buffers: segmenter pred_logits and frame_embeds (host scores,
    Hungarian links), tracker outputs (track hub), refiner pred_logits, the final masks.

* Buffers are allocated once per *shape bucket* = (stage, optimization profile) at the
  profile's max shapes (:func:`plan_buffers`) and reused for every call in that bucket; the
  clip stores are sized for the engine's ``max_frames``.
* One ``IExecutionContext`` per (stage, profile); named tensors via ``set_input_shape`` /
  ``set_tensor_address`` / ``execute_async_v3``.
* ``tracker_step`` runs once per frame with ``tQ`` live tracks; after a warm-up call per
  ``(profile, tQ)`` its enqueue is captured in a CUDA graph and replayed (:class:`GraphCache`);
  its inputs live at fixed addresses (D2D copies from the stores: ~26 MB/frame at R50 sizes,
  microseconds on a datacenter GPU), which is what makes the graph replayable.
* Decoding, the H2D copy of the next window and the segmenter overlap: ``run_resident`` returns
  as soon as the work is enqueued; the image staging buffers are double-buffered and guarded
  by CUDA events, so the host fills window k+1 while window k is copied and segmented.

Device-resident variants (beyond :class:`~dvis_trt.runtime.backends.base.Backend`):
``begin_clip(num_frames, Hp, Wp)``, ``run_resident("segmenter", ..., frame_offset=f0)``,
``clip_store(name, start, stop)`` -> :class:`DeviceTensor`, ``DeviceTensor.frame(i)`` /
``.frames(a, b)`` views, ``gather_rows(src, rows, t0, t)`` for the mask head.
"""
from __future__ import annotations

import collections
import ctypes
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from ..errors import BundleError, DependencyError, InputError
from ..manifest import BundleManifest, StageSpec, eval_dim, sha256_file, with_derived_dims
from .base import Backend, check_inputs, dtype_of

__all__ = ["ALIGNMENT", "CLIP_STORES", "HOST_FETCHED", "HOST_FED", "GRAPH_STAGES",
           "BufferPlan", "plan_buffers", "profile_max_dims",
           "GraphCache", "DeviceTensor", "TrtBackend"]

ALIGNMENT = 256  # cudaMalloc alignment; every planned buffer is rounded up to it

#: Clip-level device stores: name -> (producing stage, tensor). Leading axis = clip frame.
CLIP_STORES = {"mask_features": ("segmenter", "mask_features"),
               "frame_embeds": ("segmenter", "frame_embeds")}
#: Stage inputs read from a clip store without a copy (the address is a store slice).
STORE_VIEWS = {("refiner", "frame_embeds"): "frame_embeds",
               ("mask_head", "mask_features"): "mask_features",
               ("tracker_first", "mask_features"): "mask_features",
               ("tracker_first", "frame_embeds"): "frame_embeds",
               ("tracker_masks", "mask_features"): "mask_features"}
#: Outputs the host logic needs every call (copied to pinned host memory asynchronously).
HOST_FETCHED = {("segmenter", "pred_logits"), ("segmenter", "frame_embeds"),
                ("tracker_first", "embeds"), ("tracker_first", "pred_logits"),
                ("tracker_first", "track_pos"),
                ("tracker_step", "embeds"), ("tracker_step", "pred_logits"),
                ("tracker_step", "slot_logits"), ("tracker_step", "track_pos_out"),
                ("refiner", "pred_logits"), ("mask_head", "pred_masks"),
                ("tracker_masks", "pred_masks")}
#: Inputs that come from the host (staged through pinned memory). ``images`` is double-buffered.
HOST_FED = {("segmenter", "images"), ("tracker_step", "track_queries"),
            ("tracker_step", "track_pos"), ("tracker_step", "slot_index"),
            ("refiner", "instance_embeds"), ("tracker_masks", "embeds")}
DOUBLE_BUFFERED = {("segmenter", "images")}
#: Stages replayed from CUDA graphs (per (profile, dims) key, after one warm-up call).
GRAPH_STAGES = {"tracker_step"}


def _align(n: int, a: int = ALIGNMENT) -> int:
    return -(-int(n) // a) * a


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def profile_max_dims(profiles: Iterable[Any]) -> dict[str, int]:
    """Max of every symbol over a stage's profiles (``Profile.dims[sym].max``), plus derived
    dims (``h = Hp/4``)."""
    out: dict[str, int] = {}
    for p in profiles:
        for k, r in p.dims.items():
            out[k] = max(out.get(k, 0), int(r.max))
    return with_derived_dims(out) if ("Hp" in out or "Wp" in out) else out


@dataclass
class BufferPlan:
    """Byte sizes of every buffer the TRT backend allocates, each rounded up to
    :data:`ALIGNMENT`.

    stores: clip store name -> bytes (``(max_frames, ...)`` of the producing output).
    device: (stage, tensor) -> bytes, for every stage I/O tensor that is not a store view.
    pinned: (stage, tensor) -> bytes of page-locked host memory (x2 when double-buffered).
    views: (stage, tensor) -> store name, for tensors bound to store slices (no allocation).
    frame_bytes: store name -> bytes of one frame (the slice stride).
    """

    stores: dict[str, int] = field(default_factory=dict)
    device: dict[tuple[str, str], int] = field(default_factory=dict)
    pinned: dict[tuple[str, str], int] = field(default_factory=dict)
    views: dict[tuple[str, str], str] = field(default_factory=dict)
    frame_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def device_total(self) -> int:
        return sum(self.stores.values()) + sum(self.device.values())

    @property
    def pinned_total(self) -> int:
        return sum(self.pinned.values())


def plan_buffers(stage_specs: Mapping[str, StageSpec],
                 profile_limits: Mapping[str, Mapping[str, int]],
                 clip_frames: int | None = None) -> BufferPlan:
    """Plan the TRT backend's buffers from the stages' I/O specs and per-stage max dims.

    stage_specs: stage name -> :class:`StageSpec` (``manifest.stages``).
    profile_limits: stage name -> {symbol: max value} (see :func:`profile_max_dims`; derived
    ``h, w`` are filled in from ``Hp, Wp``).
    clip_frames: leading size of the clip stores (default: the refiner's max ``L``, else the
    mask head's max ``t``... else the segmenter's ``T``).
    Sizes = product of the max shape x dtype size, rounded up to 256 bytes; stores hold
    ``clip_frames`` frames of the segmenter's per-frame output. Raises ``ValueError`` when a
    symbol has no limit.
    """
    plan = BufferPlan()
    seg = stage_specs.get("segmenter")
    if clip_frames is None:
        for stage, sym in (("refiner", "L"), ("mask_head", "t"), ("segmenter", "T")):
            if sym in profile_limits.get(stage, {}):
                clip_frames = int(profile_limits[stage][sym])
                break
    if seg is not None:
        seg_dims = with_derived_dims(profile_limits.get("segmenter", {}))
        for store, (_, tensor) in CLIP_STORES.items():
            spec = seg.output(tensor)
            frame_shape = [eval_dim(d, seg_dims) for d in spec.shape[1:]]
            fb = math.prod(frame_shape) * _itemsize(spec.dtype)
            plan.frame_bytes[store] = fb
            plan.stores[store] = _align(fb * int(clip_frames or 1))
    for stage, spec in stage_specs.items():
        dims = with_derived_dims(profile_limits.get(stage, {}))
        for kind, group in (("in", spec.inputs), ("out", spec.outputs)):
            for t in group:
                key = (stage, t.name)
                if kind == "out" and stage == "segmenter" and t.name in CLIP_STORES \
                        and seg is not None:
                    plan.views[key] = t.name
                elif kind == "in" and key in STORE_VIEWS and seg is not None:
                    plan.views[key] = STORE_VIEWS[key]
                try:
                    shape = [eval_dim(d, dims) for d in t.shape]
                except KeyError as exc:
                    raise ValueError(f"plan_buffers: stage '{stage}' tensor '{t.name}': no "
                                     f"limit for symbol {exc.args[0]!r}") from None
                nbytes = _align(math.prod(shape) * _itemsize(t.dtype))
                if key not in plan.views:
                    plan.device[key] = nbytes
                if key in HOST_FETCHED or key in HOST_FED:
                    plan.pinned[key] = nbytes * (2 if key in DOUBLE_BUFFERED else 1)
    return plan


class GraphCache:
    """CUDA-graph bookkeeping per key (``(stage, profile, dims...)``): the first call of a key
    is a warm-up (plain enqueue; TensorRT finishes its lazy set-up there), the second captures,
    later ones replay. At most ``capacity`` graphs are kept (least recently used evicted; the
    evicted exec is returned by :meth:`put` for destruction)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._seen: collections.Counter = collections.Counter()
        self._graphs: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        g = self._graphs.get(key)
        if g is not None:
            self._graphs.move_to_end(key)
        return g

    def should_capture(self, key) -> bool:
        """Count a call of ``key``; True when it is time to capture (2nd call, not cached)."""
        self._seen[key] += 1
        return key not in self._graphs and self._seen[key] >= 2

    def put(self, key, graph_exec):
        """Store a captured graph; returns an evicted one (or None)."""
        self._graphs[key] = graph_exec
        self._graphs.move_to_end(key)
        if len(self._graphs) > self.capacity:
            _, old = self._graphs.popitem(last=False)
            return old
        return None

    def clear(self) -> list:
        out = list(self._graphs.values())
        self._graphs.clear()
        self._seen.clear()
        return out

    def __len__(self) -> int:
        return len(self._graphs)


# =============================================================================================
# device part (needs tensorrt + cuda.bindings + a GPU)
# =============================================================================================
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
        from dvis_trt.engine.builder import machine_info  # noqa: PLC0415
        from dvis_trt.engine.manifest import (check_fresh, find_engine_dir,  # noqa: PLC0415
                                              load_engine_manifest)
        trt = self._trt
        machine = machine_info(self._device)
        engine_dir = self._engine_dir or find_engine_dir(manifest, machine)
        em = load_engine_manifest(engine_dir, verify=False)
        plugin_sha = None
        if em.plugin_library:
            lib = self._plugin_library or Path(em.plugin_library.get("path", ""))
            if not lib.is_file():
                raise BundleError(f"the engines need the MSDA plugin library "
                                  f"{em.plugin_library.get('name')} but {lib} does not exist; "
                                  "run `dvis-trt build-plugins` or pass --plugin-lib")
            plugin_sha = sha256_file(lib)
            check_fresh(em, manifest, machine, plugin_sha)
            from dvis_trt.plugins import register_trt_plugin
            register_trt_plugin(lib)  # registry.load_library, before deserialising
        else:
            check_fresh(em, manifest, machine, None)
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
        se = em.stages.get(stage_name)
        if se is None:
            raise BundleError(f"{em.root} has no '{stage_name}' engine; run `dvis-trt build "
                              f"{manifest.root}`")
        data = (em.root / se.file).read_bytes()
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(f"TensorRT could not deserialize {em.root / se.file} (corrupt, or "
                              f"built by another TensorRT); run `dvis-trt build {manifest.root}`")
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
        from dvis_trt.engine.profiles import describe_limits, select_profile  # noqa: PLC0415
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
