"""Tests of the tracker's host-side numpy pieces (runtime/tracking.py).

References: brute force over all assignments for the Hungarian matching, and a literal,
list-based transcription of the official ``VideoInstanceSequence.update_pos`` (torch) for the
similarity-guided position embedding.
"""
from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from dvis_trt.runtime.tracking import match_with_embeds, similarity_guided_update


def _cost64(trc, seg):
    """Cosine cost in float64 with the official +1e-6 in the norms (independent path)."""
    t = trc.astype(np.float64)
    s = seg.astype(np.float64)
    t = t / (np.sqrt((t * t).sum(1, keepdims=True)) + 1e-6)
    s = s / (np.sqrt((s * s).sum(1, keepdims=True)) + 1e-6)
    return 1.0 - t @ s.T


def _brute_force(cost):
    """Official semantics by enumeration: argmin per row, then the rows of the minimum-cost
    assignment of min(n, Q) rows to distinct columns take their assigned column."""
    n, q = cost.shape
    out = [int(np.argmin(cost[i])) for i in range(n)]
    best, best_rows, best_cols = np.inf, None, None
    k = min(n, q)
    for rows in itertools.combinations(range(n), k):
        for cols in itertools.permutations(range(q), k):
            total = sum(cost[r, c] for r, c in zip(rows, cols))
            if total < best:
                best, best_rows, best_cols = total, rows, cols
    for r, c in zip(best_rows, best_cols):
        out[r] = c
    return np.array(out, dtype=np.int64), best


@pytest.mark.parametrize("n,q", [(1, 1), (1, 4), (3, 3), (3, 5), (4, 6), (6, 6)])
def test_match_with_embeds_brute_force_n_le_q(n, q):
    rng = np.random.default_rng(100 * n + q)
    for _ in range(5):
        trc = rng.standard_normal((n, 8)).astype(np.float32) * rng.uniform(0.1, 10)
        seg = rng.standard_normal((q, 8)).astype(np.float32)
        got = match_with_embeds(trc, seg)
        want, best = _brute_force(_cost64(trc, seg))
        assert got.dtype == np.int64 and got.shape == (n,)
        # random continuous data: the optimum is unique (gaps >> float32 rounding)
        np.testing.assert_array_equal(got, want)
        assert len(set(got.tolist())) == n                      # n <= Q: all distinct


@pytest.mark.parametrize("n,q", [(2, 1), (5, 3), (6, 4)])
def test_match_with_embeds_rows_left_by_hungarian_take_argmin(n, q):
    rng = np.random.default_rng(7 * n + q)
    for _ in range(5):
        trc = rng.standard_normal((n, 6)).astype(np.float32)
        seg = rng.standard_normal((q, 6)).astype(np.float32)
        got = match_with_embeds(trc, seg)
        want, _ = _brute_force(_cost64(trc, seg))
        np.testing.assert_array_equal(got, want)
        # exactly q rows are assigned distinct columns; the rest equal their argmin
        cost = _cost64(trc, seg)
        argmin = cost.argmin(1)
        assert len(set(got.tolist())) <= q
        assert (got == argmin).sum() >= n - q


def test_match_with_embeds_hungarian_overrides_argmin():
    # both rows prefer column 0; the assignment must give row 1 column 1
    seg = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    trc = np.array([[1.0, 0.0], [1.0, 0.2]], dtype=np.float32)
    np.testing.assert_array_equal(match_with_embeds(trc, seg), [0, 1])
    # with a third row and only two columns: that one keeps its argmin (0)
    trc3 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(match_with_embeds(trc3, seg), [0, 1, 0])


def test_match_with_embeds_zero_vector_and_errors():
    seg = np.eye(3, dtype=np.float32)
    # a zero row is harmless thanks to +1e-6 (cost 1 everywhere)
    out = match_with_embeds(np.zeros((1, 3), np.float32), seg)
    assert out.shape == (1,)
    assert match_with_embeds(np.zeros((0, 3), np.float32), seg).shape == (0,)
    with pytest.raises(ValueError, match="match_with_embeds"):
        match_with_embeds(np.zeros((2, 4), np.float32), seg)
    with pytest.raises(ValueError, match="non-finite"):
        match_with_embeds(np.full((1, 3), np.nan, np.float32), seg)


def test_match_with_embeds_equals_official_torch():
    torch = pytest.importorskip("torch")
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(5)
    trc = rng.standard_normal((12, 16)).astype(np.float32)
    seg = rng.standard_normal((9, 16)).astype(np.float32)
    t, s = torch.from_numpy(trc), torch.from_numpy(seg)
    t = t / (t.norm(dim=1)[:, None] + 1e-6)
    s = s / (s.norm(dim=1)[:, None] + 1e-6)
    cost = 1 - torch.mm(t, s.transpose(0, 1))
    idx = torch.min(cost, dim=1)[1]
    r, c = linear_sum_assignment(cost)
    idx[r] = torch.as_tensor(c, dtype=torch.int64)
    np.testing.assert_array_equal(match_with_embeds(trc, seg), idx.numpy())


# ----------------------------------------------------------------------------- update_pos
class _OfficialSeq:
    """Literal transcription of VideoInstanceSequence.update_pos (torch)."""

    def __init__(self, maximum_chache=10):
        self.maximum_chache = maximum_chache
        self.pos_embeds = []
        self.similarity_guided_pos_embed = None
        self.similarity_guided_pos_embed_list = []

    def update_pos(self, pos_embed):
        import torch
        import torch.nn.functional as F
        self.pos_embeds.append(pos_embed)
        if len(self.similarity_guided_pos_embed_list) == 0:
            self.similarity_guided_pos_embed = pos_embed
            self.similarity_guided_pos_embed_list.append(pos_embed)
        else:
            sidx = max(0, len(self.pos_embeds) - self.maximum_chache)
            allp = torch.stack(list(self.pos_embeds[sidx:-1]), dim=0)
            sim = torch.sum(torch.einsum("bc,c->b", F.normalize(allp, dim=-1),
                                         F.normalize(pos_embed.squeeze(), dim=-1))) / allp.shape[0]
            beta = max(0, sim)
            self.similarity_guided_pos_embed = (1 - beta) * self.similarity_guided_pos_embed + beta * pos_embed
            self.similarity_guided_pos_embed_list.append(self.similarity_guided_pos_embed)


def test_similarity_guided_update_matches_official_sequence():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    n, c, steps, h = 4, 6, 15, 9          # 15 updates > the 10-embed cache
    base = rng.standard_normal((n, c)).astype(np.float32)
    starts = [0, 0, 3, 8]                  # tracks born at different frames
    seqs = [_OfficialSeq() for _ in range(n)]
    guided = np.zeros((n, c), np.float32)
    hist = np.zeros((n, h, c), np.float32)
    valid = np.zeros((n, h), bool)
    saw_negative = False
    for t in range(steps):
        active = np.array([t >= s for s in starts])
        # drift around the base, sometimes flipped to give a negative similarity (beta = 0)
        new = base + 0.7 * rng.standard_normal((n, c)).astype(np.float32)
        if t % 5 == 4:
            new[1] = -base[1]
            saw_negative = True
        idx = np.nonzero(active)[0]
        g2, h2, v2 = similarity_guided_update(guided[idx], hist[idx], valid[idx], new[idx])
        guided[idx], hist[idx], valid[idx] = g2, h2, v2
        for i in idx:
            seqs[i].update_pos(torch.from_numpy(new[i].copy()))
        for i in idx:
            # float32 on both sides, a few dozen ops deep: 1e-5 covers rounding
            np.testing.assert_allclose(guided[i], seqs[i].similarity_guided_pos_embed.numpy(),
                                       rtol=1e-5, atol=1e-5)
    assert saw_negative
    assert valid[0].all() and valid[3].sum() == min(h, steps - 8)


def test_similarity_guided_update_first_call_and_beta_clamp():
    c = 3
    new = np.array([[1.0, 0.0, 0.0]], np.float32)
    g, hst, v = similarity_guided_update(np.full((1, c), 9.0, np.float32), np.zeros((1, 2, c), np.float32),
                                         np.zeros((1, 2), bool), new)
    np.testing.assert_array_equal(g, new)                       # first embed: copied
    np.testing.assert_array_equal(v, [[False, True]])
    np.testing.assert_array_equal(hst[0, 1], new[0])
    # opposite direction: mean cosine -1 -> beta 0 -> unchanged
    g2, _, _ = similarity_guided_update(g, hst, v, -new)
    np.testing.assert_array_equal(g2, g)
    # identical direction: beta 1 -> replaced by the new one
    g3, _, _ = similarity_guided_update(g, hst, v, 2 * new)
    np.testing.assert_allclose(g3, 2 * new, rtol=1e-6)
    with pytest.raises(ValueError, match="similarity_guided_update"):
        similarity_guided_update(g, hst, v[:, :1], new)


def test_tracking_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import dvis_trt.runtime.tracking as t; print(t.match_with_embeds)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
