"""Buffer planning of the TensorRT backend (no GPU needed): which tensors live where, and how
many bytes each (shape) bucket needs; the CUDA-graph cache bookkeeping.

See :mod:`dvis_trt.runtime.backends.trt` for the data flow these plans serve.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from dvis_trt.runtime.bundle import StageSpec, eval_dim, with_derived_dims

__all__ = ["ALIGNMENT", "CLIP_STORES", "STORE_VIEWS", "HOST_FETCHED", "HOST_FED",
           "DOUBLE_BUFFERED", "GRAPH_STAGES", "BufferPlan", "plan_buffers", "profile_max_dims",
           "GraphCache"]

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
