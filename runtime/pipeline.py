"""The offline DVIS-DAQ pipeline between engines: windows, tracker state, top-K (no torch).

Semantics follow the official ``DVIS_DAQ_offline`` inference path
(``dvis_daq/meta_architecture.py``: ``run_window_inference`` / ``common_inference`` /
``inference_video_vis``; ``dvis_daq/track_module.py``: ``VideoInstanceCutter.inference``), with the
stages of DESIGN.md run by a :class:`~dvis_trt.runtime.backends.base.Backend` and everything
between them done here, vectorised over tracks with numpy:

per frame   segmenter scores (frame 0) or tracker scores (+ slot branch with ``OVIS_INFER``) ->
            validity -> track hub update (append / invalid count / kick-out after 8 / birth) ->
            similarity-guided position embeds -> the next frame's track queries;
per clip    noise filtering, ranking by the softmax of mean logits, top-``OFFLINE_TOPK_NUM``,
            fill to ``NUM_NEW_INS`` with the frame-linked segmenter queries, refiner,
            top-``MAX_NUM`` (query, class) pairs, masks for those only, in time chunks, straight
            into RLE (masks are never held for the whole clip).

Long videos (``clip_frames``): the video is cut into clips; the tracker state (live tracks, their
last embeds, position-embedding history, invalid counts) carries over, so track ids stay stable;
each clip's refiner sees the clip's frames only (tracks that started earlier are not front-padded,
tracks that continue are not tail-padded beyond the clip); per-frame data of finished clips is
dropped, so memory is bounded by ``clip_frames``. The official long-video path (``keep`` /
``long_video_start_fidx``) does the same on the tracker side; its refiner padding breaks for
tracks that span clips, which is why ours uses the clip-local rule above.

Instances of one track across clips are merged by (track id, label): their per-frame masks are
concatenated (``None`` where the instance was not selected) and their score is the mean of the
clip scores weighted by clip length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .bundle.config import InferenceConfig
from .postprocess import MaskUpsampler, fg_scores, minvis_link, select_topk
from .preprocess import ResizeGeometry, normalize_and_pad, resize_frame
from .results import encode_rle_block
from .tracing import NULL_TRACER, Tracer
from .tracking import match_with_embeds, similarity_guided_update

KICK_OUT_FRAME_NUM = 8   # official VideoInstanceCutter(kick_out_frame_num=8), not configurable
POS_HISTORY = 9          # official maximum_chache (10) minus the new embed
FILL_ID_BASE = 1_000_000  # fill queries of clip c get ids FILL_ID_BASE * (c + 1) + j, j >= 1


class TrackHub:
    """The tracker's state, vectorised over live tracks (official ``video_ins_hub``).

    Live tracks (the official ``last_seq_ids``, in their order) are rows of ``live_*`` arrays:
    last embed (the next frame's track query), similarity-guided position embed, position-embed
    history, invalid-frame count. Per-frame records (frame index, track ids, embeds, logits) are
    appended once per frame (one numpy call, no per-track loop) and grouped per track only when a
    clip is finished. Ids are deterministic: 0, 1, 2, ... in order of birth.
    """

    def __init__(self, hidden_dim: int, num_logits: int):
        c = hidden_dim
        self.c = c
        self.num_logits = num_logits
        self.live_ids = np.zeros((0,), np.int64)
        self.live_embed = np.zeros((0, c), np.float32)
        self.live_guided = np.zeros((0, c), np.float32)
        self.live_hist = np.zeros((0, POS_HISTORY, c), np.float32)
        self.live_hist_valid = np.zeros((0, POS_HISTORY), bool)
        self.live_invalid = np.zeros((0,), np.int64)
        self.next_id = 0
        self.start = np.zeros((0,), np.int64)   # birth frame per track id
        self.count = np.zeros((0,), np.int64)   # stored frames per track id (valid + invalid)
        self.guided_all = np.zeros((0, c), np.float32)  # latest guided pos per track id
        self.records: List[Tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self.started = False

    @property
    def num_live(self) -> int:
        return int(self.live_ids.shape[0])

    def _grow(self, n_new: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + n_new, dtype=np.int64)
        self.next_id += n_new
        self.start = np.concatenate([self.start, np.zeros(n_new, np.int64)])
        self.count = np.concatenate([self.count, np.zeros(n_new, np.int64)])
        self.guided_all = np.concatenate([self.guided_all, np.zeros((n_new, self.c), np.float32)])
        return ids

    def update(self, frame: int, embeds: np.ndarray, logits: np.ndarray, track_pos: np.ndarray,
               valid: np.ndarray) -> None:
        """Apply one frame's tracker output (official per-frame loop of ``inference``).

        Rows ``[0, num_live)`` of ``embeds``/``logits``/``track_pos``/``valid`` belong to the live
        tracks in order, the rest to new-instance (or, on frame 0, segmenter) queries.
        """
        n_live = self.num_live
        valid = np.asarray(valid, bool)
        v_live, v_new = valid[:n_live], valid[n_live:]
        inv = np.where(v_live, 0, self.live_invalid + 1)
        keep = v_live | (inv < KICK_OUT_FRAME_NUM)          # kicked-out tracks become dead
        # position embeds: only valid rows update (official update_pos on valid frames)
        guided, hist, hist_valid = self.live_guided.copy(), self.live_hist.copy(), \
            self.live_hist_valid.copy()
        if v_live.any():
            g, h, hv = similarity_guided_update(guided[v_live], hist[v_live], hist_valid[v_live],
                                                track_pos[:n_live][v_live])
            guided[v_live], hist[v_live], hist_valid[v_live] = g, h, hv
        new_rows = n_live + np.flatnonzero(v_new)
        new_ids = self._grow(len(new_rows))
        self.start[new_ids] = frame
        n_new = len(new_rows)
        new_hist = np.zeros((n_new, POS_HISTORY, self.c), np.float32)
        new_hist_valid = np.zeros((n_new, POS_HISTORY), bool)
        g_new, h_new, hv_new = similarity_guided_update(
            np.zeros((n_new, self.c), np.float32), new_hist, new_hist_valid, track_pos[new_rows])
        rows = np.concatenate([np.flatnonzero(keep), new_rows])
        self.live_ids = np.concatenate([self.live_ids[keep], new_ids])
        self.live_embed = embeds[rows].astype(np.float32, copy=True)
        self.live_guided = np.concatenate([guided[keep], g_new])
        self.live_hist = np.concatenate([hist[keep], h_new])
        self.live_hist_valid = np.concatenate([hist_valid[keep], hv_new])
        self.live_invalid = np.concatenate([inv[keep], np.zeros(n_new, np.int64)])
        self.count[self.live_ids] += 1
        self.guided_all[self.live_ids] = self.live_guided
        self.records.append((frame, self.live_ids.copy(), self.live_embed.copy(),
                             logits[rows].astype(np.float32, copy=True)))
        self.started = True

    def clip_tracks(self, clip_start: int, clip_len: int, noise_frame_num: int,
                    topk: Optional[int] = None, rank: Optional[Callable] = None):
        """Group the clip's records per track (official ``common_inference`` tail).

        Returns ``(track_ids (n,), mean_logits (n, K+1), instance_embeds (clip_len, n, C))``
        for the tracks kept by the noise filter, in birth order; frames of a track outside its
        span in the clip carry its similarity-guided position embed (official padding).

        With ``topk`` (and ``rank``: ``mean_logits (n, K+1) -> scores (n,)``), only the ``topk``
        best-ranked tracks are returned, best first (stable: birth order breaks ties), and only
        their embeds are made dense: the host never holds a frames x all-tracks x C array
        (official ``OFFLINE_TOPK_NUM`` selection, done before densifying instead of after).
        """
        recs = [r for r in self.records if clip_start <= r[0] < clip_start + clip_len]
        if not recs:
            return (np.zeros((0,), np.int64), np.zeros((0, self.num_logits), np.float32),
                    np.zeros((clip_len, 0, self.c), np.float32))
        frames = np.concatenate([np.full(len(r[1]), r[0], np.int64) for r in recs])
        ids = np.concatenate([r[1] for r in recs])
        embeds = np.concatenate([r[2] for r in recs])
        logits = np.concatenate([r[3] for r in recs])
        present = np.unique(ids)
        # official noise filter: fewer than NOISE_FRAME_NUM frames and not reaching the clip end
        end = self.start[present] + self.count[present]
        keep = ~((self.count[present] < noise_frame_num) & (end < clip_start + clip_len))
        track_ids = present[keep]
        col = np.full(self.next_id, -1, np.int64)
        col[track_ids] = np.arange(len(track_ids))
        sel = col[ids] >= 0
        cols = col[ids[sel]]
        sums = np.zeros((len(track_ids), self.num_logits), np.float64)
        np.add.at(sums, cols, logits[sel])
        counts = np.bincount(cols, minlength=len(track_ids)).astype(np.float64)
        mean_logits = (sums / counts[:, None]).astype(np.float32)
        if topk is not None:
            order = np.argsort(-rank(mean_logits), kind="stable")[:topk]
            track_ids, mean_logits = track_ids[order], mean_logits[order]
            col = np.full(self.next_id, -1, np.int64)
            col[track_ids] = np.arange(len(track_ids))
            sel = col[ids] >= 0
            cols = col[ids[sel]]
        inst = np.broadcast_to(self.guided_all[track_ids][None],
                               (clip_len, len(track_ids), self.c)).copy()
        inst[frames[sel] - clip_start, cols] = embeds[sel]
        return track_ids, mean_logits, inst

    def end_clip(self, clip_end: int) -> None:
        """Drop per-frame records before ``clip_end`` (dead tracks vanish with them)."""
        self.records = [r for r in self.records if r[0] >= clip_end]


@dataclass
class ClipResult:
    """Instances of one clip. ``rles[s][t]`` is the pycocotools RLE (counts as str) of
    instance ``s`` at clip frame ``t``; ``masks`` (S, t, H, W) bool only when requested."""

    start: int
    length: int
    scores: np.ndarray
    labels: np.ndarray
    track_ids: np.ndarray
    query_index: np.ndarray
    rles: List[List[dict]]
    masks: Optional[np.ndarray] = None
    num_tracks: int = 0
    refiner_ids: Optional[np.ndarray] = None  # ids of all refiner queries, in query order


@dataclass
class VideoResult:
    """Merged instances of a whole video (see the module docstring for the merge rule)."""

    num_frames: int
    image_size: Tuple[int, int]
    scores: np.ndarray
    labels: np.ndarray
    track_ids: np.ndarray
    segmentations: List[List[Optional[dict]]]
    clips: List[ClipResult] = field(default_factory=list)
    num_tracks: int = 0


class OfflinePipeline:
    """Runs videos through a bundle's stages on one backend.

    Args:
        backend: a loaded :class:`~dvis_trt.runtime.backends.base.Backend` (all five stages).
        settings: :class:`~dvis_trt.runtime.bundle.config.InferenceConfig` (``manifest.config``).
        constants: the bundle's host constants: ``bg_slots`` (S, C), ``seg_query_feat`` (Q, C).
        window: frames per segmenter call and per mask-head chunk (a performance knob; results
            do not depend on it).
        upsampler: mask resizer (default :class:`MaskUpsampler`).
        tracer: the tracing hook (:mod:`~dvis_trt.runtime.tracing`): named spans per phase
            (default: none, no cost).
    """

    def __init__(self, backend, settings: InferenceConfig, constants: Dict[str, np.ndarray],
                 window: int = 5, upsampler: Optional[MaskUpsampler] = None,
                 keep_masks: bool = False, tracer: Optional[Tracer] = None):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.backend = backend
        self.s = settings
        self.bg_slots = np.asarray(constants["bg_slots"], np.float32)
        self.seg_query_feat = np.asarray(constants["seg_query_feat"], np.float32)
        self.window = int(window)
        self.upsampler = upsampler or MaskUpsampler()
        self.keep_masks = keep_masks
        self.timings: Dict[str, float] = {}
        self.tracer = tracer or NULL_TRACER

    # ---------------------------------------------------------------- helpers
    def _run(self, stage: str, inputs: Dict[str, np.ndarray], fetch: Sequence[str], **kw):
        import time
        with self.tracer.span(f"engine.{stage}"):
            t0 = time.perf_counter()
            out = self.backend.run_resident(stage, inputs, fetch=fetch, **kw)
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0
        return out

    def _host(self, x) -> np.ndarray:
        return x if isinstance(x, np.ndarray) else self.backend.to_host(x)

    def _frame_of(self, x, j: int):
        """Frame ``j`` of a (T, ...) stage output: numpy, or a backend handle (the backend's
        ``take(x, j)`` if it has one, else the handle's ``frame(j)``, e.g. TensorRT's
        ``DeviceTensor``)."""
        if isinstance(x, np.ndarray):
            return x[j]
        take = getattr(self.backend, "take", None)
        return take(x, j) if take is not None else x.frame(j)

    @property
    def _clip_stores(self) -> bool:
        """Device-resident backends with clip stores (TensorRT): the segmenter writes each
        window's ``mask_features`` / ``frame_embeds`` at its frame offset in a per-clip store
        (``begin_clip(num_frames, Hp, Wp)`` once per clip, ``run_resident(..., frame_offset=)``),
        so the handles of earlier windows stay valid until the clip's masks are made."""
        return bool(getattr(self.backend, "device_resident", False)) and \
            callable(getattr(self.backend, "begin_clip", None))

    # ---------------------------------------------------------------- per frame
    def _track_frame(self, hub: TrackHub, frame: int, frame_embeds: np.ndarray,
                     seg_logits: np.ndarray, mask_pooled: np.ndarray, mask_features) -> None:
        with self.tracer.span("tracker"):
            self._track_frame_traced(hub, frame, frame_embeds, seg_logits, mask_pooled,
                                     mask_features)

    def _track_frame_traced(self, hub: TrackHub, frame: int, frame_embeds: np.ndarray,
                            seg_logits: np.ndarray, mask_pooled: np.ndarray,
                            mask_features) -> None:
        s, span = self.s, self.tracer.span
        if not hub.started:
            out = self._run("tracker_first", {"frame_embeds": frame_embeds,
                                              "mask_features": mask_features},
                            fetch=("embeds", "pred_logits", "track_pos"))
            pos_key = "track_pos"
            with span("tracker.scores"):
                valid = fg_scores(seg_logits) > s.aux_inference_select_threshold
        else:
            n = hub.num_live
            with span("tracker.match"):
                slot_index = match_with_embeds(np.concatenate([hub.live_embed, self.bg_slots]),
                                               self.seg_query_feat)
            out = self._run("tracker_step", {
                "track_queries": hub.live_embed, "track_pos": hub.live_guided,
                "frame_embeds": frame_embeds, "mask_pooled": mask_pooled,
                "mask_features": mask_features, "slot_index": slot_index.astype(np.int64)},
                fetch=("embeds", "pred_logits", "slot_logits", "track_pos_out"))
            pos_key = "track_pos_out"
            with span("tracker.scores"):
                scores = fg_scores(self._host(out["pred_logits"]))
                if s.ovis_infer:
                    fg = fg_scores(self._host(out["slot_logits"]))
                    valid = np.concatenate([
                        (scores[:n] > s.inference_select_threshold) & (fg > s.dis_fg_threshold),
                        scores[n:] > s.inference_select_threshold])
                else:
                    valid = scores > s.inference_select_threshold
        with span("tracker.hub_update"):
            hub.update(frame, self._host(out["embeds"]), self._host(out["pred_logits"]),
                       self._host(out[pos_key]), valid)

    # ---------------------------------------------------------------- per clip
    def process_clip(self, frames: Sequence[np.ndarray], hub: TrackHub,
                     geometry: ResizeGeometry, clip_start: int = 0, clip_index: int = 0,
                     on_frames: Optional[Callable[[int], None]] = None) -> ClipResult:
        """Run one clip through all stages.

        ``frames``: the clip's RGB uint8 frames, already resized to ``geometry.resized``
        (:meth:`run_video` resizes each frame once, as it arrives, so a clip holds small frames,
        not 4K ones); ``geometry``: the video's :class:`ResizeGeometry` (masks are returned at
        ``geometry.orig``). ``on_frames(n)`` is called after each segmenter window has been
        tracked, with the window's frame count (progress bars). Returns the clip's instances."""
        s, span = self.s, self.tracer.span
        (h0, w0), (h, w), (hp, wp) = geometry.orig, geometry.resized, geometry.padded
        t_len = len(frames)
        frame_embeds, seg_logits, mf_windows = [], [], []
        stores = self._clip_stores
        if stores:
            self.backend.begin_clip(t_len, hp, wp)
        for ws in range(0, t_len, self.window):
            chunk = frames[ws:ws + self.window]
            with span("preprocess.normalize"):
                images = normalize_and_pad(chunk, s.pixel_mean, s.pixel_std,
                                           s.size_divisibility, input_format=s.input_format)
            out = self._run("segmenter", {"images": images},
                            fetch=("frame_embeds", "pred_logits", "mask_pooled"),
                            **({"frame_offset": ws} if stores else {}))
            fe, lg, mp = out["frame_embeds"], out["pred_logits"], out["mask_pooled"]
            mf = out["mask_features"]
            mf_windows.append(mf)
            frame_embeds.append(fe)
            seg_logits.append(lg)
            for j in range(len(chunk)):
                self._track_frame(hub, clip_start + ws + j, fe[j], lg[j], mp[j],
                                  self._frame_of(mf, j))
            if on_frames:
                on_frames(len(chunk))
        frame_embeds = np.concatenate(frame_embeds)
        seg_logits = np.concatenate(seg_logits)

        with span("select"):
            # top-OFFLINE_TOPK_NUM tracks by the foreground score of their mean logits,
            # selected before their embeds are made dense (memory: frames x topK x C)
            with span("select.noise_filter"):
                track_ids, _, queries = hub.clip_tracks(clip_start, t_len, s.noise_frame_num,
                                                        topk=s.offline_topk_num, rank=fg_scores)
            ids: List[int] = [int(i) for i in track_ids]
            num_left = s.num_new_ins - queries.shape[1]
            if num_left > 0:
                with span("select.link"):
                    link_logits, link_embeds = minvis_link(frame_embeds, seg_logits)
                    order = np.argsort(-fg_scores(link_logits), kind="stable")[:num_left]
                queries = np.concatenate([queries, link_embeds[:, order]], axis=1)
                ids += [FILL_ID_BASE * (clip_index + 1) + j for j in range(1, len(order) + 1)]
        out = self._run("refiner", {"instance_embeds": np.ascontiguousarray(queries),
                                    "frame_embeds": frame_embeds},
                        fetch=("pred_logits", "mask_embed"))
        with span("select.topk"):
            scores, labels, query = select_topk(self._host(out["pred_logits"]), s.max_num)
        mask_embed = self._host(out["mask_embed"])[:, query]        # (T, S, C)

        rles: List[List[dict]] = [[] for _ in range(len(query))]
        kept = [] if self.keep_masks else None
        with span("finalize"):
            for wi, ws in enumerate(range(0, t_len, self.window)):
                emb = np.ascontiguousarray(mask_embed[ws:ws + self.window])
                mo = self._run("mask_head", {"mask_embed": emb,
                                             "mask_features": mf_windows[wi]},
                               fetch=("pred_masks",))
                logits = self._host(mo["pred_masks"])                  # (S, t, h/4, w/4)
                for t in range(logits.shape[1]):  # one frame at a time: (S, H, W) bool at most
                    with span("finalize.mask_resize"):
                        masks = self.upsampler(logits[:, t:t + 1], (hp, wp), (h, w), (h0, w0))
                    with span("finalize.rle"):
                        for si, block in enumerate(encode_rle_block(masks)):
                            rles[si].extend(block)
                    if kept is not None:
                        kept.append(masks)
        hub.end_clip(clip_start + t_len)
        return ClipResult(start=clip_start, length=t_len, scores=scores, labels=labels,
                          track_ids=np.asarray(ids, np.int64)[query] if len(ids) else
                          np.zeros((0,), np.int64),
                          query_index=query, rles=rles,
                          masks=np.concatenate(kept, axis=1) if kept else None,
                          num_tracks=hub.next_id,
                          refiner_ids=np.asarray(ids, np.int64))

    # ---------------------------------------------------------------- whole video
    def run_video(self, frames: Iterable[np.ndarray], clip_frames: Optional[int] = None,
                  on_frames: Optional[Callable[[int], None]] = None,
                  geometry: Optional[ResizeGeometry] = None) -> VideoResult:
        """Run a whole video (an iterable of RGB uint8 frames of one size), in clips of
        ``clip_frames`` frames (None: one clip). Each frame is resized once, as it arrives, with
        the video's :class:`ResizeGeometry` (``geometry`` when it matches frame 0, else computed
        from frame 0).
        ``on_frames(n)`` is called after each segmenter window with its frame count (progress
        bars; the counts add up to the video's length). Raises InputError for a frame of
        another size than the video's."""
        span = self.tracer.span
        hub: Optional[TrackHub] = None
        clips: List[ClipResult] = []
        buf: List[np.ndarray] = []
        start = 0
        geom = geometry

        def flush():
            nonlocal hub, start, buf
            if hub is None:
                hub = TrackHub(self.seg_query_feat.shape[1], self.s.num_classes + 1)
            clips.append(self.process_clip(buf, hub, geom, clip_start=start,
                                           clip_index=len(clips), on_frames=on_frames))
            start += len(buf)
            buf = []

        first = True
        for f in frames:
            if first and (geom is None or tuple(f.shape[:2]) != geom.orig):
                geom = ResizeGeometry.of(f.shape[0], f.shape[1], self.s)  # frame 0 decides
            first = False
            if tuple(f.shape[:2]) != geom.orig:
                from dvis_trt.errors import InputError
                raise InputError(f"frame {start + len(buf)} is {f.shape[1]}x{f.shape[0]}, frame 0 "
                                 f"is {geom.orig[1]}x{geom.orig[0]}: all frames of a video must "
                                 "have one size")
            with span("preprocess.resize"):
                buf.append(resize_frame(np.ascontiguousarray(f), *geom.resized))
            if clip_frames and len(buf) >= clip_frames:
                flush()
        if buf:
            flush()
        return merge_clips(clips, start, geom.orig if geom else (0, 0), hub.next_id if hub else 0)


def merge_clips(clips: List[ClipResult], num_frames: int, size: Tuple[int, int],
                num_tracks: int) -> VideoResult:
    """Merge clip instances by (track id, label); see the module docstring."""
    keys: Dict[Tuple[int, int], int] = {}
    scores: List[List[Tuple[float, int]]] = []
    labels: List[int] = []
    tids: List[int] = []
    segs: List[List[Optional[dict]]] = []
    for clip in clips:
        for si in range(len(clip.scores)):
            key = (int(clip.track_ids[si]), int(clip.labels[si]))
            if key in keys and segs[keys[key]][clip.start] is not None:
                key = key + (clip.start, si)  # the same pair twice in one clip: keep both
            if key not in keys:
                keys[key] = len(segs)
                segs.append([None] * num_frames)
                scores.append([])
                labels.append(key[1])
                tids.append(key[0])
            k = keys[key]
            scores[k].append((float(clip.scores[si]), clip.length))
            segs[k][clip.start:clip.start + clip.length] = clip.rles[si]
    merged = np.asarray([sum(s * n for s, n in sc) / sum(n for _, n in sc) for sc in scores],
                        np.float32)
    order = np.argsort(-merged, kind="stable")  # best first (one clip: already in this order)
    return VideoResult(num_frames=num_frames, image_size=tuple(size), scores=merged[order],
                       labels=np.asarray(labels, np.int64)[order],
                       track_ids=np.asarray(tids, np.int64)[order],
                       segmentations=[segs[i] for i in order], clips=clips,
                       num_tracks=num_tracks)
