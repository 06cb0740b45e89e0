"""Realistic sample inputs for the five stages, made by chaining any backend (no torch here).

Used to trace the stages for export (:mod:`dvis_trt.export.onnx_export`), by ``dvis-trt
check`` and by the parity tests. Random tensors alone would be poor test data: mask logits,
masked-attention masks and the tracker's slot indices only get realistic statistics when the
inputs of a stage are what the previous stage produced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import numpy as np

__all__ = ["SampleDims", "sample_stage_inputs", "sample_images", "tracker_step_inputs",
           "cosine_hungarian_match"]

Runner = Callable[[str, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class SampleDims:
    """Sizes of the sample inputs of every stage (see :func:`sample_stage_inputs`).

    ``frames`` T and ``height``/``width`` Hp, Wp (positive multiples of 32) of the segmenter
    window; ``tracks`` tQ (0 allowed: every track died); ``refiner_frames`` L and
    ``refiner_queries`` Qr (default: ``num_new_ins``); ``mask_frames`` t (<= L) and
    ``mask_queries`` Qs (<= Qr).
    """

    frames: int = 2
    height: int = 64
    width: int = 96
    tracks: int = 3
    refiner_frames: int = 4
    refiner_queries: Optional[int] = None
    mask_frames: int = 2
    mask_queries: int = 5

    def check(self) -> None:
        """Raise ValueError for sizes the stages cannot take."""
        for name in ("frames", "refiner_frames", "mask_frames", "mask_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"SampleDims.{name} must be >= 1, got {getattr(self, name)}")
        if self.tracks < 0:
            raise ValueError(f"SampleDims.tracks must be >= 0, got {self.tracks}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 32 or v % 32:
                raise ValueError(f"SampleDims.{name} must be a positive multiple of 32 (the "
                                 f"padded input size), got {v}")
        if self.mask_frames > self.refiner_frames:
            raise ValueError(f"SampleDims.mask_frames ({self.mask_frames}) must be <= "
                             f"refiner_frames ({self.refiner_frames})")
        if self.refiner_queries is not None and self.refiner_queries < self.mask_queries:
            raise ValueError(f"SampleDims.mask_queries ({self.mask_queries}) must be <= "
                             f"refiner_queries ({self.refiner_queries})")


def cosine_hungarian_match(track_feats: np.ndarray, seg_feats: np.ndarray) -> np.ndarray:
    """Official ``VideoInstanceCutter.match_with_embeds``: the runtime's
    :func:`~dvis_trt.runtime.tracking.match_with_embeds` (one host matcher)."""
    from dvis_trt.runtime.tracking import match_with_embeds

    return match_with_embeds(track_feats, seg_feats)


def sample_images(frames: int, height: int, width: int,
                  rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """(frames, 3, height, width) float32 "normalised pixels" ~ N(0, 1), with the bottom and
    right quarters zeroed like the padding of a preprocessed frame."""
    rng = np.random.default_rng(0) if rng is None else rng
    images = rng.standard_normal((frames, 3, height, width), dtype=np.float32)
    images[:, :, height * 3 // 4:, :] = 0.0
    images[:, :, :, width * 3 // 4:] = 0.0
    return images


def tracker_step_inputs(first: Mapping[str, np.ndarray], frame: Mapping[str, np.ndarray],
                        constants: Mapping[str, np.ndarray], tracks: int,
                        rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
    """``tracker_step`` inputs with ``tracks`` live tracks.

    Args:
        first: tracker_first outputs (``embeds`` (Q, C), ``track_pos`` (Q, C)): track ``j``
            takes row ``j % Q`` (plus N(0, 0.01) noise for rows repeated beyond Q).
        frame: one frame's segmenter outputs ``frame_embeds`` (Q, C), ``mask_pooled`` (Q, D),
            ``mask_features`` (D, h, w).
        constants: ``bg_slots``, ``seg_query_feat``; ``slot_index`` is
            :func:`cosine_hungarian_match` of ``cat(track_queries, bg_slots)`` against
            ``seg_query_feat``, as the host computes it.
        tracks: tQ >= 0.
        rng: numpy generator (default: seeded with 0).
    """
    if tracks < 0:
        raise ValueError(f"tracks must be >= 0, got {tracks}")
    rng = np.random.default_rng(0) if rng is None else rng
    q, c = first["embeds"].shape
    rows = np.arange(tracks) % q
    repeat = (np.arange(tracks) >= q)[:, None]
    noise = 0.01 * rng.standard_normal((tracks, c), dtype=np.float32)
    tq = (first["embeds"][rows] + noise * repeat).astype(np.float32)
    tpos = np.asarray(first["track_pos"][rows], np.float32)
    bg = np.asarray(constants["bg_slots"], np.float32)
    return {
        "track_queries": np.ascontiguousarray(tq), "track_pos": np.ascontiguousarray(tpos),
        "frame_embeds": np.ascontiguousarray(frame["frame_embeds"], np.float32),
        "mask_pooled": np.ascontiguousarray(frame["mask_pooled"], np.float32),
        "mask_features": np.ascontiguousarray(frame["mask_features"], np.float32),
        "slot_index": cosine_hungarian_match(np.concatenate([tq, bg]),
                                             np.asarray(constants["seg_query_feat"], np.float32))}


def sample_stage_inputs(run: Runner, dims: SampleDims, constants: Mapping[str, np.ndarray], *,
                        num_new_ins: Optional[int] = None, seed: int = 0,
                        offline: bool = True) -> Dict[str, Dict[str, np.ndarray]]:
    """Inputs for all five stages, chained through ``run`` from random images.

    * segmenter: ``images`` ~ N(0, 1) (normalised pixels), the bottom and right quarters zeroed
      like padding;
    * tracker_first: frame 0 of the segmenter's outputs;
    * tracker_step: frame ``T-1`` of the segmenter's outputs; rows of tracker_first's
      ``embeds`` / ``track_pos`` as track queries / positions (cycled with a little noise if
      more tracks are asked than there are queries); ``slot_index`` =
      :func:`cosine_hungarian_match` of ``cat(track_queries, bg_slots)`` against
      ``seg_query_feat`` (what the host does);
    * refiner: ``instance_embeds`` = segmenter frame embeds (frames cycled over L, queries over
      Qr) plus N(0, 0.1) noise, and the matching ``frame_embeds``;
    * mask_head: ``run("refiner")``'s ``mask_embed`` (first t frames, first Qs queries) and the
      segmenter's ``mask_features`` of the same frames.

    Args:
        run: ``run(stage, {input: array}) -> {output: array}`` (a backend's ``run``, or
            :func:`dvis_trt.export.stages.eager_runner`).
        dims: sizes.
        constants: ``bg_slots`` (S, C) and ``seg_query_feat`` (Q, C) (the bundle's
            ``constants.npz``).
        num_new_ins: N, default ``Q`` (rows of ``seg_query_feat``; the official model needs
            N == Q); the default Qr.
        seed: seed of every random draw.
        offline: also the refiner and mask_head inputs (False for an online model).
    Returns:
        ``{stage: {input name: array}}``; floats float32, ``slot_index`` int64.
    Raises:
        ValueError: bad ``dims``; KeyError: a constant is missing.
    """
    dims.check()
    rng = np.random.default_rng(seed)
    seg_query_feat = np.asarray(constants["seg_query_feat"], np.float32)
    n_new = int(seg_query_feat.shape[0] if num_new_ins is None else num_new_ins)

    images = sample_images(dims.frames, dims.height, dims.width, rng)
    out: Dict[str, Dict[str, np.ndarray]] = {"segmenter": {"images": images}}
    seg = run("segmenter", out["segmenter"])

    out["tracker_first"] = {"frame_embeds": np.ascontiguousarray(seg["frame_embeds"][0]),
                            "mask_features": np.ascontiguousarray(seg["mask_features"][0])}
    first = run("tracker_first", out["tracker_first"])

    i = dims.frames - 1
    out["tracker_step"] = tracker_step_inputs(
        first, {k: seg[k][i] for k in ("frame_embeds", "mask_pooled", "mask_features")},
        constants, dims.tracks, rng)
    # tracker_masks (online mode): tracker_first's embeds against frame 0's mask features
    out["tracker_masks"] = {"embeds": np.ascontiguousarray(first["embeds"]),
                            "mask_features": out["tracker_first"]["mask_features"]}
    if not offline:  # an online model has no refiner / mask_head
        return out

    big_l = dims.refiner_frames
    qr = n_new if dims.refiner_queries is None else int(dims.refiner_queries)
    if qr < dims.mask_queries:
        raise ValueError(f"SampleDims.mask_queries ({dims.mask_queries}) must be <= "
                         f"refiner_queries ({qr})")
    frame_idx = np.arange(big_l) % dims.frames
    fe_l = seg["frame_embeds"][frame_idx]                               # (L, Q, C)
    inst = fe_l[:, np.arange(qr) % fe_l.shape[1]]                       # (L, Qr, C)
    inst = inst + 0.1 * rng.standard_normal(inst.shape, dtype=np.float32)
    out["refiner"] = {"instance_embeds": np.ascontiguousarray(inst, dtype=np.float32),
                      "frame_embeds": np.ascontiguousarray(fe_l, dtype=np.float32)}
    ref = run("refiner", out["refiner"])
    t = dims.mask_frames
    out["mask_head"] = {
        "mask_embed": np.ascontiguousarray(ref["mask_embed"][:t, :dims.mask_queries]),
        "mask_features": np.ascontiguousarray(seg["mask_features"][frame_idx[:t]])}
    return out
