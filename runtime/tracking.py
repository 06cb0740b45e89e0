"""Host-side (numpy) pieces of DVIS-DAQ's referring tracker. No torch here.

* :func:`cosine_cost` - ``1 - cosine`` between two sets of rows: THE cost of every host-side
  Hungarian match (slot branch here, the frame-by-frame link in
  :func:`~dvis_trt.runtime.postprocess.minvis_link`, ``check``'s sample inputs).
* :func:`match_with_embeds` - the slot branch's query matching (official
  ``VideoInstanceCutter.match_with_embeds``, ``dvis_daq/track_module.py``); its result is the
  ``slot_index`` input of the ``tracker_step`` stage.
* :func:`similarity_guided_update` - the tracks' similarity-guided position embedding
  (official ``VideoInstanceSequence.update_pos``), vectorised over tracks.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment


def cosine_cost(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``1 - cos`` of every row pair: (n, C) x (m, C) -> (n, m), in ``a``'s float dtype.

    Rows are L2-normalised as ``x / (||x|| + eps)`` (official ``match_with_embeds`` uses
    ``eps = 1e-6``; ``minvis_post_processing``'s ``match_from_embds`` none, ``eps = 0``).
    """
    one = a.dtype.type(1.0)
    e = a.dtype.type(eps)
    an = a / (np.linalg.norm(a, axis=1, keepdims=True) + e)
    bn = b / (np.linalg.norm(b, axis=1, keepdims=True) + e)
    return one - an @ bn.T


def match_with_embeds(trc_feats: np.ndarray, seg_feats: np.ndarray) -> np.ndarray:
    """Pick one segmenter query per tracker-side query by cosine cost (official ``match_with_embeds``).

    Follows ``VideoInstanceCutter.match_with_embeds`` of ``dvis_daq/track_module.py``:
    rows are L2-normalised as ``x / (||x|| + 1e-6)``, cost ``C = 1 - cos`` (n, Q), every row
    first takes its cheapest column (``argmin``, first index on ties), then the rows that
    ``scipy.optimize.linear_sum_assignment(C)`` assigns are overwritten with their assigned
    column. When n <= Q every row is assigned (distinct columns); when n > Q only Q rows are,
    the others keep their argmin. Computed in float32 like the official (CUDA float32) code.

    Args:
        trc_feats: (n, C) float - in DVIS-DAQ ``cat(track_queries, bg_slots)``, n = tQ + S.
        seg_feats: (Q, C) float - the segmenter's ``query_feat`` weight.
    Returns:
        (n,) int64 indices into ``seg_feats`` rows.
    Raises:
        ValueError: if the inputs are not 2-D with equal channels, ``seg_feats`` is empty,
            or either holds a non-finite value.
    """
    trc = np.asarray(trc_feats, dtype=np.float32)
    seg = np.asarray(seg_feats, dtype=np.float32)
    if trc.ndim != 2 or seg.ndim != 2 or trc.shape[1] != seg.shape[1]:
        raise ValueError(f"match_with_embeds: expected trc_feats (n, C) and seg_feats (Q, C), got "
                         f"{trc.shape} and {seg.shape}")
    if seg.shape[0] == 0:
        raise ValueError("match_with_embeds: seg_feats has no rows (Q == 0)")
    if not (np.isfinite(trc).all() and np.isfinite(seg).all()):
        raise ValueError("match_with_embeds: non-finite values in the query features")
    if trc.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    cost = cosine_cost(trc, seg, eps=1e-6)                     # n, Q float32
    out = np.argmin(cost, axis=1).astype(np.int64)
    rows, cols = linear_sum_assignment(cost)
    out[rows] = cols
    return out


def similarity_guided_update(guided: np.ndarray, history: np.ndarray, history_valid: np.ndarray,
                             new_pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse a new position embedding into each track's similarity-guided one (official ``update_pos``).

    Follows ``VideoInstanceSequence.update_pos`` of ``dvis_daq/track_module.py`` (CTVIS's
    similarity-guided feature fusion, arXiv 2203.14208), vectorised over n tracks:

    * a track with no earlier position embedding (no valid history entry) starts with
      ``guided = new_pos``;
    * otherwise ``beta = max(0, mean_k cos(prev_k, new_pos))`` over its previous embeds
      ``prev_k`` in the cache, with ``cos`` using ``x / max(||x||, 1e-12)``
      (``F.normalize``), and ``guided = (1 - beta) * guided + beta * new_pos``.

    The official cache (``maximum_chache = 10``) is the last 10 embeds *including* the new one,
    so the similarity uses at most the 9 previous ones: pass ``history`` with H = 9 slots to
    follow it exactly (H = ``maximum_chache - 1``). Only valid frames call ``update_pos``
    officially, so call this only for tracks that are valid in the current frame.

    Args:
        guided: (n, C) float32 current similarity-guided embeds (ignored for rows without
            history).
        history: (n, H, C) float32 previous position embeds, oldest first, right-aligned (the
            newest in slot H-1); H >= 1.
        history_valid: (n, H) bool, which history slots hold an embed (a right-aligned run).
        new_pos: (n, C) float32 the ``track_pos`` produced for this frame.
    Returns:
        ``(guided_new (n, C), history_new (n, H, C), history_valid_new (n, H))`` with the
        history shifted left by one and ``new_pos`` stored in slot H-1.
    Raises:
        ValueError: on inconsistent shapes.
    """
    guided = np.asarray(guided, dtype=np.float32)
    history = np.asarray(history, dtype=np.float32)
    valid = np.asarray(history_valid, dtype=bool)
    new = np.asarray(new_pos, dtype=np.float32)
    if (new.ndim != 2 or guided.shape != new.shape or history.ndim != 3
            or history.shape[0] != new.shape[0] or history.shape[2] != new.shape[1]
            or history.shape[1] < 1 or valid.shape != history.shape[:2]):
        raise ValueError(
            f"similarity_guided_update: expected guided (n, C), history (n, H>=1, C), "
            f"history_valid (n, H), new_pos (n, C); got {guided.shape}, {history.shape}, "
            f"{valid.shape}, {new.shape}")
    tiny = np.float32(1e-12)
    new_n = new / np.maximum(np.linalg.norm(new, axis=-1, keepdims=True), tiny)
    hist_n = history / np.maximum(np.linalg.norm(history, axis=-1, keepdims=True), tiny)
    cos = np.einsum("nhc,nc->nh", hist_n, new_n)                           # n, H
    count = valid.sum(axis=1)
    sim = np.where(valid, cos, np.float32(0)).sum(axis=1) / np.maximum(count, 1).astype(np.float32)
    # Python's max(0, s) returns 0 unless s > 0 (also for NaN)
    beta = np.where(sim > 0, sim, np.float32(0)).astype(np.float32)[:, None]
    fused = (np.float32(1) - beta) * guided + beta * new
    guided_new = np.where((count > 0)[:, None], fused, new).astype(np.float32)
    history_new = np.concatenate([history[:, 1:], new[:, None]], axis=1)
    valid_new = np.concatenate([valid[:, 1:], np.ones((valid.shape[0], 1), dtype=bool)], axis=1)
    return guided_new, history_new, valid_new
