"""Monolithic eager DVIS-DAQ offline: the PyTorch baseline and the parity oracle.

Follows the official inference path of ``dvis_daq/meta_architecture.py`` class
``DVIS_DAQ_offline``: ``inference`` -> ``run_window_inference`` -> ``common_inference`` (segmenter
over windows, ``VideoInstanceCutter.inference`` over frames with its track hub, noise filtering,
top-``OFFLINE_TOPK_NUM`` tracks, ``minvis_post_processing`` fill, ``TemporalRefiner``) ->
``inference_video_vis`` (top-``MAX_NUM`` over (query, class), masks resized to the original size).

Deliberate, documented differences (labels and order only; the instance set is the same):
- Track ids are deterministic: tracker sequences are numbered 0, 1, 2, ... in order of birth
  (the official code draws random ints); fill queries from the frame-by-frame link get
  ``FILL_ID_BASE + j`` (j = 1..), a separate range.
- Where the official code takes an unsorted ``topk``, we sort by score (descending, stable), so
  the order of tracks into the refiner and of the final instances is deterministic. The refiner is
  permutation-equivariant over instance queries, so this changes no value.
- The tracker's per-frame masks (``pred_masks`` of the hub) are not stored: the offline output
  never uses them (final masks come from the refiner); only their count is needed, which equals the
  number of stored embeds.

This file is deliberately written in the official style (python objects per track, torch
tensors); ``dvis_trt.runtime`` implements the same semantics vectorised in numpy, and the two are
compared end to end in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dvis_trt.runtime.bundle.config import InferenceConfig
from dvis_trt.runtime.tracing import NULL_TRACER, Tracer
from dvis_trt.runtime.preprocess import preprocess_frames

FILL_ID_BASE = 1_000_000
KICK_OUT_FRAME_NUM = 8  # hard-coded in the official VideoInstanceCutter (kick_out_frame_num)
MAXIMUM_CACHE = 10      # VideoInstanceSequence.maximum_chache


class DaqCriterionStub(nn.Module):
    """Holds the training-only ``daq_criterion.empty_weight`` (K+1) so official checkpoints load
    strictly; never used at inference (official ``DVIS_VideoSetCriterion.empty_weight``)."""

    def __init__(self, num_classes: int, eos_coef: float = 0.1):
        super().__init__()
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        self.register_buffer("empty_weight", weight)


class TrackSequence:
    """One tracked instance (official ``VideoInstanceSequence``, inference fields only)."""

    def __init__(self, start_time: int, track_id: int):
        self.start_time = start_time
        self.track_id = track_id
        self.embeds: List[Tensor] = []
        self.logits: List[Tensor] = []
        self.pos_embeds: List[Tensor] = []
        self.sg_pos_embed: Optional[Tensor] = None  # similarity_guided_pos_embed
        self.invalid_frames = 0
        self.dead = False

    def update_pos(self, pos_embed: Tensor) -> None:
        """Similarity-guided fusion of the position embedding (official ``update_pos``)."""
        self.pos_embeds.append(pos_embed)
        if self.sg_pos_embed is None:
            self.sg_pos_embed = pos_embed
            return
        start = max(0, len(self.pos_embeds) - MAXIMUM_CACHE)
        history = torch.stack(self.pos_embeds[start:-1], dim=0)
        sim = (F.normalize(history, dim=-1) @ F.normalize(pos_embed, dim=-1)).sum() / history.shape[0]
        beta = max(0.0, float(sim))
        self.sg_pos_embed = (1 - beta) * self.sg_pos_embed + beta * pos_embed


def cosine_hungarian_match(track_feats: Tensor, seg_feats: Tensor) -> Tensor:
    """Official ``VideoInstanceCutter.match_with_embeds`` (torch + scipy), int64 (n,).

    Cost ``1 - cos`` with ``+1e-6`` in the norms; each row takes its argmin, then rows assigned by
    the Hungarian solution take their assigned column.
    """
    a = track_feats / (track_feats.norm(dim=1)[:, None] + 1e-6)
    b = seg_feats / (seg_feats.norm(dim=1)[:, None] + 1e-6)
    cost = 1 - a @ b.t()
    idx = cost.min(dim=1)[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    idx[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return idx


def minvis_match(target: Tensor, current: Tensor) -> np.ndarray:
    """Official ``match_from_embds``: permutation of ``current`` aligning it to ``target``."""
    cur = current / current.norm(dim=1)[:, None]
    tgt = target / target.norm(dim=1)[:, None]
    cost = 1 - cur @ tgt.t()
    return linear_sum_assignment(cost.t().numpy())[1]


@dataclass
class TrackerLoop:
    """State of the official per-frame tracker loop across frames (``video_ins_hub``,
    ``last_seq_ids`` and our deterministic id counter)."""

    hub: Dict[int, TrackSequence] = field(default_factory=dict)
    last_ids: Optional[List[int]] = None
    next_id: int = 0


@torch.no_grad()
def track_frame(tracker: nn.Module, seg_query_feat: Tensor, s: InferenceConfig,
                state: TrackerLoop, i: int, fe: Tensor, mf: Tensor, mp: Tensor,
                seg_logits: Tensor, tracer: Tracer = NULL_TRACER
                ) -> Tuple[Tensor, Tensor, List[Tuple[int, int, bool]]]:
    """One frame of the official ``VideoInstanceCutter.inference`` loop (``dvis_daq/track_module.py``).

    Args:
        tracker: :class:`~.tracker.VideoInstanceCutter`; seg_query_feat: (Q, C) the segmenter's
            ``query_feat.weight``; s: thresholds; state: the loop state (updated in place);
            i: frame index (0 = first frame of the video, ``resume=False``);
            fe (Q, C), mf (D, h, w), mp (Q, D), seg_logits (Q, K+1): this frame's segmenter
            outputs; tracer: spans ``engine.tracker_first`` / ``engine.tracker_step`` around the
            tracker stage calls (:mod:`dvis_trt.runtime.tracing`).
    Returns:
        ``(embeds (n, C), logits (n, K+1), stored)``: the tracker's raw outputs of every query
        row and, for each row the hub stored this frame, ``(row, track_id, valid)`` in
        ``last_seq_ids`` order (valid rows and tracks in their grace period before kick-out).
    """
    tracker.set_seg_query_feat(seg_query_feat)  # the slot branch's start features
    hub, last_ids = state.hub, state.last_ids
    if i == 0:
        with tracer.span("engine.tracker_first"):
            embeds, logits, pos = tracker.forward_first(fe, mf)
        seg_scores = F.softmax(seg_logits, dim=-1)[:, :-1].max(dim=-1)[0]
        valid = seg_scores > s.aux_inference_select_threshold
    else:
        tq = torch.stack([hub[t].embeds[-1] for t in last_ids]) if last_ids else \
            fe.new_zeros((0, fe.shape[-1]))
        tpos = torch.stack([hub[t].sg_pos_embed for t in last_ids]) if last_ids else \
            fe.new_zeros((0, fe.shape[-1]))
        slot_index = cosine_hungarian_match(torch.cat([tq, tracker.bg_slots.weight]),
                                            seg_query_feat)
        with tracer.span("engine.tracker_step"):
            embeds, logits, slot_logits, pos = tracker.forward_step(tq, tpos, fe, mp, mf,
                                                                    slot_index)
        n_tq = tq.shape[0]
        scores = F.softmax(logits, dim=-1)[:, :-1].max(dim=-1)[0]
        if s.ovis_infer:
            fg = F.softmax(slot_logits, dim=-1)[:, :-1].max(dim=-1)[0]
            valid_trc = (scores[:n_tq] > s.inference_select_threshold) & \
                (fg > s.dis_fg_threshold)
            valid = torch.cat([valid_trc, scores[n_tq:] > s.inference_select_threshold])
        else:
            valid = scores > s.inference_select_threshold
    cur_ids: List[int] = []
    stored: List[Tuple[int, int, bool]] = []
    for k in range(embeds.shape[0]):
        tracked = last_ids is not None and k < len(last_ids)
        if bool(valid[k]):
            if tracked:
                tid = last_ids[k]
            else:
                tid = state.next_id
                state.next_id += 1
                hub[tid] = TrackSequence(i, tid)
            seq = hub[tid]
            seq.embeds.append(embeds[k])
            seq.logits.append(logits[k])
            seq.invalid_frames = 0
            seq.update_pos(pos[k])
            cur_ids.append(tid)
            stored.append((k, tid, True))
        elif tracked:
            seq = hub[last_ids[k]]
            seq.invalid_frames += 1
            if seq.invalid_frames >= KICK_OUT_FRAME_NUM:
                seq.dead = True
                continue
            seq.embeds.append(embeds[k])
            seq.logits.append(logits[k])
            cur_ids.append(seq.track_id)
            stored.append((k, seq.track_id, False))
    state.last_ids = cur_ids
    return embeds, logits, stored


class DvisDaqOffline(nn.Module):
    """DVIS-DAQ offline, eager, whole clip at once.

    Children carry the official state-dict prefixes: ``backbone``, ``sem_seg_head``, ``tracker``,
    ``refiner``, ``daq_criterion`` (training-only buffer). ``pixel_mean``/``pixel_std`` are
    non-persistent buffers, as in the official model.
    """

    def __init__(self, backbone: nn.Module, sem_seg_head: nn.Module, tracker: nn.Module,
                 refiner: nn.Module, settings: InferenceConfig):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.tracker = tracker
        # registration order = official state-dict order (the criterion is set before the refiner)
        self.daq_criterion = DaqCriterionStub(settings.num_classes)
        self.refiner = refiner
        self.settings = settings
        #: frames per segmenter call; the official forward hard-codes 5 (results do not depend on it)
        self.window = 5
        #: the tracing hook (:mod:`dvis_trt.runtime.tracing`): spans per phase of ``forward``
        self.tracer = NULL_TRACER
        self.register_buffer("pixel_mean", torch.tensor(settings.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(settings.pixel_std).view(-1, 1, 1), False)

    # ------------------------------------------------------------------ stages
    def segmenter(self):
        """The segmenter stage module (backbone + sem_seg_head), not registered as a child."""
        from .segmenter import Segmenter
        seg = self.__dict__.get("_segmenter")
        if seg is None:
            seg = Segmenter(self.backbone, self.sem_seg_head)
            self.__dict__["_segmenter"] = seg
        return seg

    @torch.no_grad()
    def run_segmenter(self, images: Tensor) -> Dict[str, Tensor]:
        """Segmenter over windows of ``self.window`` frames, outputs concatenated
        over time (official ``segmenter_windows_inference``)."""
        seg = self.segmenter()
        outs: Dict[str, List[Tensor]] = {}
        w = max(1, int(self.window))
        for s in range(0, images.shape[0], w):
            with self.tracer.span("engine.segmenter"):
                out = dict(zip(seg.OUTPUT_NAMES, seg(images[s:s + w])))
            for k, v in out.items():
                outs.setdefault(k, []).append(v)
        return {k: torch.cat(v, dim=0) for k, v in outs.items()}

    # ------------------------------------------------------------------ tracker
    @torch.no_grad()
    def run_tracker(self, seg: Dict[str, Tensor]) -> Dict[int, TrackSequence]:
        """The referring tracker over all frames (official ``VideoInstanceCutter.inference`` for
        a clip starting at frame 0, ``resume=False``). Returns the track hub in birth order."""
        state = TrackerLoop()
        for i in range(seg["frame_embeds"].shape[0]):
            track_frame(self.tracker, self.sem_seg_head.predictor.query_feat.weight,
                        self.settings, state, i, seg["frame_embeds"][i], seg["mask_features"][i],
                        seg["mask_pooled"][i], seg["pred_logits"][i], self.tracer)
        return state.hub

    # ------------------------------------------------------------------ offline head
    @torch.no_grad()
    def select_instances(self, hub: Dict[int, TrackSequence], seg: Dict[str, Tensor]):
        """Noise filtering, top-K tracks, naive-link fill (official ``common_inference`` tail).

        Returns (instance_embeds (T, N, C), ids list of N ints)."""
        s = self.settings
        fe = seg["frame_embeds"]
        num_frames = fe.shape[0]
        seqs, logits, queries = [], [], []
        for seq in hub.values():
            n = len(seq.embeds)
            if n < s.noise_frame_num and seq.start_time + n < num_frames:
                continue
            front = seq.start_time
            tail = num_frames - n - front
            pad = seq.sg_pos_embed[None]
            queries.append(torch.cat([pad.repeat(front, 1), torch.stack(seq.embeds),
                                      pad.repeat(tail, 1)]))
            logits.append(torch.stack(seq.logits).mean(0))
            seqs.append(seq)
        ids: List[int] = []
        if seqs:
            logits_t = torch.stack(logits)
            scores = F.softmax(logits_t, dim=-1)[:, :-1].max(dim=-1)[0]
            order = torch.sort(scores, descending=True, stable=True)[1][:s.offline_topk_num]
            queries = [queries[int(j)] for j in order]
            ids = [seqs[int(j)].track_id for j in order]
        num_left = s.num_new_ins - len(queries)
        if num_left > 0:
            link_logits, link_embeds = self.minvis_link(seg)
            naive = F.softmax(link_logits, dim=-1)[:, :-1].max(dim=-1)[0]
            order = torch.sort(naive, descending=True, stable=True)[1][:num_left]
            queries.extend(link_embeds[:, int(j)] for j in order)
            ids.extend(FILL_ID_BASE + j for j in range(1, len(order) + 1))
        return torch.stack(queries, dim=1), ids

    @staticmethod
    def minvis_link(seg: Dict[str, Tensor]):
        """Frame-by-frame Hungarian link of the segmenter's queries (official
        ``minvis_post_processing``). Returns (mean logits (Q, K+1), linked embeds (T, Q, C))."""
        fe, lg = seg["frame_embeds"], seg["pred_logits"]
        out_e, out_l = [fe[0]], [lg[0]]
        for i in range(1, fe.shape[0]):
            idx = torch.as_tensor(minvis_match(out_e[-1], fe[i]), dtype=torch.long)
            out_e.append(fe[i][idx])
            out_l.append(lg[i][idx])
        return sum(out_l) / len(out_l), torch.stack(out_e, dim=0)

    # ------------------------------------------------------------------ whole clip
    @torch.no_grad()
    def forward(self, frames: Sequence[np.ndarray]) -> Dict[str, object]:
        """Run one clip.

        Args:
            frames: T RGB uint8 arrays (H, W, 3) of one video.
        Returns:
            dict with ``scores`` float32 (S,), ``labels`` int64 (S,) (0-based class index),
            ``track_ids`` int64 (S,), ``query_index`` int64 (S,) (refiner query, like the
            official ``pred_ids``), ``masks`` bool (S, T, H, W) at the original frame size,
            ``num_tracks`` (tracker sequences born), ``image_size`` (H, W). S = ``MAX_NUM``
            (fewer only if there are fewer (query, class) pairs).
        """
        s, span = self.settings, self.tracer.span
        h0, w0 = frames[0].shape[:2]
        with span("preprocess"):
            images_np, (h, w) = preprocess_frames(frames, s.min_size_test, s.max_size_test,
                                                  s.pixel_mean, s.pixel_std,
                                                  s.size_divisibility, s.input_format)
            images = torch.from_numpy(images_np)
        with span("segmenter"):
            seg = self.run_segmenter(images)
        with span("tracker"):
            hub = self.run_tracker(seg)
        with span("select"):
            instance_embeds, ids = self.select_instances(hub, seg)
        with span("refiner"), span("engine.refiner"):
            pred_logits, mask_embed = self.refiner.forward_stage(instance_embeds,
                                                                 seg["frame_embeds"])
        with span("finalize"):
            return self.finalize(pred_logits, mask_embed, seg["mask_features"], ids,
                                 images.shape[-2:], (h, w), (h0, w0), num_tracks=len(hub))

    @torch.no_grad()
    def finalize(self, pred_logits: Tensor, mask_embed: Tensor, mask_features: Tensor,
                 ids: List[int], padded_size, image_size, out_size, num_tracks: int = 0):
        """Top-``MAX_NUM`` over (query, class) and masks (official ``inference_video_vis``)."""
        s = self.settings
        k = s.num_classes
        scores = F.softmax(pred_logits, dim=-1)[:, :-1]
        flat = scores.flatten()
        order = torch.sort(flat, descending=True, stable=True)[1][:s.max_num]
        top_scores = flat[order]
        labels = order % k
        query = order // k
        masks = torch.empty((len(order), mask_features.shape[0], *out_size), dtype=torch.bool)
        emb = mask_embed[:, query]  # (T, S, C)
        for t in range(mask_features.shape[0]):
            with self.tracer.span("engine.mask_head"):
                logits_t = self.refiner.mask_head(emb[t:t + 1], mask_features[t:t + 1])[:, 0]
            up = F.interpolate(logits_t[None], size=tuple(padded_size), mode="bilinear",
                               align_corners=False)
            up = up[:, :, :image_size[0], :image_size[1]]
            up = F.interpolate(up, size=tuple(out_size), mode="bilinear", align_corners=False)
            masks[:, t] = up[0] > 0
        return {
            "scores": top_scores.float().numpy(),
            "labels": labels.numpy().astype(np.int64),
            "track_ids": np.asarray([ids[int(q)] for q in query], dtype=np.int64),
            "query_index": query.numpy().astype(np.int64),
            "masks": masks.numpy(),
            "num_tracks": num_tracks,
            "image_size": tuple(out_size),
        }
