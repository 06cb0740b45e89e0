"""Low-latency modes between engines (no torch): online (per frame) and near-online (per clip).

**Online** follows the official ``DVIS_DAQ_online`` inference path
(``dvis_daq/meta_architecture.py`` ``run_window_inference`` + ``dvis_daq/track_module.py``
``VideoInstanceCutter.inference``) one frame at a time: segmenter (T = 1) -> ``tracker_first``
(frame 0) or Hungarian slot match + ``tracker_step`` -> validity and the track hub
(:class:`~dvis_trt.runtime.pipeline.TrackHub`, the offline pipeline's own per-frame code) -> the
tracker's own class logits and masks of every track the hub stored at this frame
(``tracker_masks`` stage) -> masks resized like ``inference_video_vis`` -> RLE + box. A
:class:`FrameResult` leaves as soon as its frame is done. No refiner: this is the online model's
output, not the offline model's. Per-frame records are dropped after each frame, so memory does
not grow with the stream.

What a frame reports (n = tracks the hub stored at the frame, the official ``pred_masks`` /
``pred_logits`` entries of that frame): track id (birth order, stable for the stream), the
frame's class logits, score (max foreground softmax), label, ``valid`` (``False`` while a track
sits in its grace period of up to 7 misses before the kick-out) and the mask. The official
model's video-level output (mean logits per track, ``NOISE_FRAME_NUM`` filter, top
``MAX_NUM``) needs the whole video; :func:`dvis_trt.runtime.online.video_level` rebuilds it
from the frame results when a finite video is wanted.

**Near-online** is the offline model over consecutive clips of N frames with the tracker state
carried (:meth:`~dvis_trt.runtime.pipeline.OfflinePipeline.process_clip`, the ``--clip-frames``
machinery): a clip's results are emitted when its last frame is processed; ids stay stable
across clips. Latency ~ N frames plus one refiner call; accuracy close to offline.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .postprocess import MaskUpsampler, softmax
from .preprocess import ResizeGeometry, normalize_and_pad, resize_frame
from .results import encode_rle_block

MODES = ("online", "near-online", "offline")


@functools.lru_cache(maxsize=8)
def _empty_counts(h: int, w: int) -> str:
    from pycocotools import mask as mask_util

    return mask_util.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0]["counts"].decode()


def _EMPTY_RLE(h: int, w: int) -> dict:
    """The RLE of an empty (h, w) mask (a track whose mask was not computed this frame)."""
    return {"size": [int(h), int(w)], "counts": _empty_counts(int(h), int(w))}


@dataclass
class FrameResult:
    """Instances of one frame.

    Attributes:
        index: frame index in the source (0-based, counting frames that were dropped).
        timestamp: the source's presentation time in seconds (``None`` if unknown).
        image_size: (H, W) of the frame.
        track_ids: int64 (n,); labels: int64 (n,) 0-based class; scores: float32 (n,);
        valid: bool (n,) (see the module docstring); logits: float32 (n, K+1) (online) or None.
        rles: n COCO RLE dicts (``counts`` str) at (H, W); boxes: float32 (n, 4) x, y, w, h
            in pixels (zeros for an empty mask).
        masks: bool (n, H, W) only when the pipeline keeps masks, else None.
        arrival: ``time.monotonic()`` when the frame arrived; done: when its result was ready.
        mode: ``online`` / ``near-online`` / ``offline``.
    """

    index: int
    timestamp: Optional[float]
    image_size: Tuple[int, int]
    track_ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    valid: np.ndarray
    rles: List[dict]
    boxes: np.ndarray
    logits: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None
    arrival: Optional[float] = None
    done: Optional[float] = None
    mode: str = "online"

    @property
    def latency(self) -> Optional[float]:
        """Seconds from the frame's arrival to its result (None when not measured)."""
        if self.arrival is None or self.done is None:
            return None
        return self.done - self.arrival

    def instances(self, include_invalid: bool = False,
                  class_names: Optional[Sequence[str]] = None) -> List[dict]:
        """Per-instance dicts: ``track_id``, ``class`` (0-based), ``label`` (name if known),
        ``score``, ``box`` [x, y, w, h], ``rle`` {size, counts}, and ``valid`` when
        ``include_invalid``."""
        out = []
        for k in range(len(self.track_ids)):
            if not include_invalid and not bool(self.valid[k]):
                continue
            lab = int(self.labels[k])
            d = {"track_id": int(self.track_ids[k]), "class": lab,
                 "label": class_names[lab] if class_names and lab < len(class_names) else None,
                 "score": round(float(self.scores[k]), 6),
                 "box": [round(float(v), 2) for v in self.boxes[k]],
                 "rle": self.rles[k]}
            if include_invalid:
                d["valid"] = bool(self.valid[k])
            out.append(d)
        return out

    def to_json(self, include_invalid: bool = False,
                class_names: Optional[Sequence[str]] = None) -> dict:
        """The JSON Lines record of this frame (see ``docs`` / README, ``dvis-trt stream``)."""
        rec = {"frame": int(self.index),
               "timestamp": None if self.timestamp is None else round(float(self.timestamp), 6),
               "height": int(self.image_size[0]), "width": int(self.image_size[1]),
               "mode": self.mode}
        if self.latency is not None:
            rec["latency_ms"] = round(1000.0 * self.latency, 2)
        rec["instances"] = self.instances(include_invalid, class_names)
        return rec


def rle_boxes(rles: Sequence[dict]) -> np.ndarray:
    """(n, 4) float32 ``x, y, w, h`` boxes of RLE masks (pycocotools ``toBbox``)."""
    if not rles:
        return np.zeros((0, 4), np.float32)
    from pycocotools import mask as mask_util

    return np.asarray(mask_util.toBbox([{"size": r["size"], "counts": r["counts"]}
                                        for r in rles]), np.float32).reshape(-1, 4)


class OnlinePipeline:
    """Per-frame DVIS-DAQ online inference on a backend (see the module docstring).

    Args:
        backend: a loaded backend with the stages ``segmenter``, ``tracker_first``,
            ``tracker_step``, ``tracker_masks`` (any bundle exported by this dvis-trt; older
            bundles lack ``tracker_masks``: re-export). Host backends and the resident
            protocol of :class:`~dvis_trt.runtime.pipeline.OfflinePipeline` (TensorRT: mask
            features stay on the device; only the tracker's embeds/logits, the Hungarian slot
            match and the final masks cross to the host) are both supported.
        settings: :class:`~dvis_trt.runtime.bundle.config.InferenceConfig` of the bundle.
        constants: ``bg_slots`` (S, C), ``seg_query_feat`` (Q, C) (the bundle's constants).
        upsampler: mask resizer (default :class:`MaskUpsampler`).
        keep_masks: also return dense bool masks (``FrameResult.masks``).
        all_masks: masks (and boxes) for every stored track, also those in their grace period
            (``valid`` False); default: valid tracks only — the others get an empty RLE and a
            zero box, which halves the post-processing on a crowded frame (masks are resized
            to the frame size and RLE-encoded per track: the largest host cost per frame).
    """

    def __init__(self, backend, settings, constants: Dict[str, np.ndarray],
                 upsampler: Optional[MaskUpsampler] = None, keep_masks: bool = False,
                 all_masks: bool = False):
        from .pipeline import OfflinePipeline

        # the offline pipeline's per-frame tracker code and backend plumbing, used as is
        self.core = OfflinePipeline(backend, settings, constants, window=1, upsampler=upsampler)
        self.backend = backend
        self.s = settings
        self.keep_masks = keep_masks
        self.all_masks = all_masks
        self.reset()

    @property
    def timings(self) -> Dict[str, float]:
        """Seconds spent per stage so far (shared with the wrapped offline pipeline)."""
        return self.core.timings

    def reset(self) -> None:
        """Start a new video: the next frame is frame 0 (tracks are born from the segmenter)."""
        from .pipeline import TrackHub

        self.hub = TrackHub(self.core.seg_query_feat.shape[1], self.s.num_classes + 1)
        self._geometry = None
        self._count = 0

    def _geom(self, h0: int, w0: int):
        if self._geometry is None or self._geometry[0] != (h0, w0):
            g = ResizeGeometry.of(h0, w0, self.s)
            self._geometry = (g.orig, g.resized, g.padded)
        return self._geometry

    def process(self, rgb: np.ndarray, index: Optional[int] = None,
                timestamp: Optional[float] = None, arrival: Optional[float] = None
                ) -> FrameResult:
        """Run one RGB uint8 frame (H, W, 3) and return its :class:`FrameResult`.

        All frames of one video must have one size (``reset()`` between videos).
        Raises InputError for a frame of another size than frame 0.
        """
        arrival = time.monotonic() if arrival is None else arrival
        s, core = self.s, self.core
        (h0, w0), (h, w), (hp, wp) = self._geom(*rgb.shape[:2])
        if self._count and tuple(rgb.shape[:2]) != tuple(self._first_size):
            from dvis_trt.errors import InputError
            raise InputError(f"frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, the stream started "
                             f"at {self._first_size[1]}x{self._first_size[0]}: one size per stream")
        if not self._count:
            self._first_size = (h0, w0)
        frame = self._count
        images = normalize_and_pad([resize_frame(np.ascontiguousarray(rgb), h, w)], s.pixel_mean,
                                   s.pixel_std, s.size_divisibility, input_format=s.input_format)
        stores = core._clip_stores
        if stores:
            self.backend.begin_clip(1, hp, wp)
        out = core._run("segmenter", {"images": images},
                        fetch=("frame_embeds", "pred_logits", "mask_pooled"),
                        **({"frame_offset": 0} if stores else {}))
        mf = core._frame_of(out["mask_features"], 0)
        core._track_frame(self.hub, frame, out["frame_embeds"][0], out["pred_logits"][0],
                          out["mask_pooled"][0], mf)
        hub = self.hub
        _, ids, embeds, logits = hub.records[-1]
        hub.end_clip(frame + 1)          # per-frame records are not needed any more
        self._count += 1
        valid = hub.live_invalid == 0    # 0 misses: valid at this very frame
        n = len(ids)
        rows = np.arange(n) if self.all_masks else np.flatnonzero(valid)
        masks = np.zeros((n, h0, w0), bool) if self.keep_masks else None
        rles = [_EMPTY_RLE(h0, w0)] * n if n else []
        if len(rows):
            mo = core._run("tracker_masks", {"embeds": np.ascontiguousarray(embeds[rows]),
                                             "mask_features": mf}, fetch=("pred_masks",))
            low = core._host(mo["pred_masks"])                       # (m, h/4, w/4)
            up = core.upsampler(low[:, None], (hp, wp), (h, w), (h0, w0))   # (m, 1, H, W)
            for r, block in zip(rows, encode_rle_block(up)):
                rles[r] = block[0]
            if masks is not None:
                masks[rows] = up[:, 0]
        probs = softmax(logits.astype(np.float32), axis=-1)[:, :-1] if n else \
            np.zeros((0, s.num_classes), np.float32)
        return FrameResult(
            index=frame if index is None else int(index), timestamp=timestamp,
            image_size=(h0, w0), track_ids=ids.astype(np.int64), labels=probs.argmax(-1)
            .astype(np.int64) if n else np.zeros(0, np.int64),
            scores=probs.max(-1).astype(np.float32) if n else np.zeros(0, np.float32),
            valid=valid.copy(), rles=rles, boxes=rle_boxes(rles), logits=logits,
            masks=masks, arrival=arrival, done=time.monotonic(), mode="online")

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[FrameResult]:
        """Run a whole video from frame 0 (``reset()`` first); one result per frame, in order."""
        self.reset()
        for rgb in frames:
            yield self.process(rgb)


class NearOnlinePipeline:
    """The offline model over consecutive clips of ``clip_frames`` frames (see the module
    docstring). :meth:`push` buffers a frame and returns ``[]``, or - when the frame closes a
    clip - that clip's :class:`FrameResult` s, one per frame; :meth:`flush` closes a partial
    clip (end of stream).

    Each frame reports the clip's selected instances whose mask is not empty at that frame
    (top ``MAX_NUM`` (instance, class) pairs of the clip's refiner, as ``run --clip-frames``).
    """

    def __init__(self, backend, settings, constants: Dict[str, np.ndarray], clip_frames: int,
                 upsampler: Optional[MaskUpsampler] = None, window: int = 5,
                 keep_masks: bool = False):
        from .pipeline import OfflinePipeline

        if int(clip_frames) < 1:
            raise ValueError("clip_frames must be >= 1")
        self.core = OfflinePipeline(backend, settings, constants, window=window,
                                    upsampler=upsampler, keep_masks=keep_masks)
        self.s = settings
        self.clip_frames = int(clip_frames)
        self.keep_masks = keep_masks
        self.reset()

    @property
    def timings(self) -> Dict[str, float]:
        return self.core.timings

    def reset(self) -> None:
        from .pipeline import TrackHub

        self.hub = TrackHub(self.core.seg_query_feat.shape[1], self.s.num_classes + 1)
        self._buf: List[np.ndarray] = []
        self._meta: List[Tuple[Optional[int], Optional[float], float]] = []
        self._start = 0
        self._clips = 0
        self._size: Optional[Tuple[int, int]] = None
        self._geometry: Optional[ResizeGeometry] = None

    def push(self, rgb: np.ndarray, index: Optional[int] = None,
             timestamp: Optional[float] = None, arrival: Optional[float] = None
             ) -> List[FrameResult]:
        arrival = time.monotonic() if arrival is None else arrival
        if self._size is None:
            self._size = tuple(rgb.shape[:2])
            self._geometry = ResizeGeometry.of(self._size[0], self._size[1], self.s)
        elif tuple(rgb.shape[:2]) != self._size:
            from dvis_trt.errors import InputError
            raise InputError(f"frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, the stream started "
                             f"at {self._size[1]}x{self._size[0]}: one size per stream")
        # resized on arrival: a clip holds small frames (as ``run_video``)
        self._buf.append(resize_frame(np.ascontiguousarray(rgb), *self._geometry.resized))
        self._meta.append((index, timestamp, arrival))
        if len(self._buf) >= self.clip_frames:
            return self.flush()
        return []

    def flush(self) -> List[FrameResult]:
        """Close the buffered (possibly partial) clip and return its frame results."""
        if not self._buf:
            return []
        clip = self.core.process_clip(self._buf, self.hub, self._geometry,
                                      clip_start=self._start, clip_index=self._clips)
        done = time.monotonic()
        out = []
        for t, (index, ts, arrival) in enumerate(self._meta):
            keep = [si for si in range(len(clip.scores)) if _rle_area(clip.rles[si][t]) > 0]
            rles = [clip.rles[si][t] for si in keep]
            out.append(FrameResult(
                index=self._start + t if index is None else int(index), timestamp=ts,
                image_size=tuple(self._size), track_ids=np.asarray(clip.track_ids)[keep]
                .astype(np.int64), labels=np.asarray(clip.labels)[keep].astype(np.int64),
                scores=np.asarray(clip.scores)[keep].astype(np.float32),
                valid=np.ones(len(keep), bool), rles=rles, boxes=rle_boxes(rles),
                masks=clip.masks[keep, t] if clip.masks is not None else None,
                arrival=arrival, done=done, mode="near-online"))
        self._start += len(self._buf)
        self._clips += 1
        self._buf, self._meta = [], []
        return out


def _rle_area(rle: Optional[dict]) -> int:
    if not rle:
        return 0
    from pycocotools import mask as mask_util

    return int(mask_util.area({"size": rle["size"], "counts": rle["counts"]}))


def video_level(frames: Sequence[FrameResult], num_classes: int, max_num: int,
                noise_frame_num: int) -> Dict[str, object]:
    """The official ``DVIS_DAQ_online`` video-level output from online frame results.

    Same rule as :func:`dvis_trt.export.model.dvis_daq_online.video_output` (tracks shorter
    than ``noise_frame_num`` stored frames that end before the last frame dropped, mean
    logits, top ``max_num`` (track, class) pairs, stable order): returns ``scores`` float32 (S,),
    ``labels`` int64 (S,), ``track_ids`` int64 (S,), ``segmentations`` (S lists of T RLE dicts or
    None where the track was not stored).
    """
    t_len = len(frames)
    per: Dict[int, dict] = {}
    for t, fr in enumerate(frames):
        for j, tid in enumerate(fr.track_ids.tolist()):
            rec = per.setdefault(int(tid), {"start": t, "frames": [], "logits": []})
            rec["frames"].append((t, j))
            rec["logits"].append(np.asarray(fr.logits[j], np.float64))
    kept = [tid for tid, r in per.items()
            if not (len(r["frames"]) < noise_frame_num and r["start"] + len(r["frames"]) < t_len)]
    if not kept:
        return {"scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int64),
                "track_ids": np.zeros(0, np.int64), "segmentations": []}
    mean = np.stack([np.mean(per[t]["logits"], axis=0) for t in kept]).astype(np.float32)
    flat = softmax(mean, axis=-1)[:, :num_classes].reshape(-1)
    order = np.argsort(-flat, kind="stable")[:max_num]
    rows, labels = order // num_classes, order % num_classes
    segs = []
    for r in rows:
        seg: List[Optional[dict]] = [None] * t_len
        for t, j in per[kept[r]]["frames"]:
            seg[t] = frames[t].rles[j]
        segs.append(seg)
    return {"scores": flat[order].astype(np.float32), "labels": labels.astype(np.int64),
            "track_ids": np.asarray([kept[r] for r in rows], np.int64), "segmentations": segs}
