"""Memory bounded by design: top-K tracks are selected before their embeds are made dense (same
selection as densify-then-select), and ``--clip-frames auto`` plans clips from a cost model
that counts the clip arrays, the refiner's time attention and the results."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dvis_trt.runtime.memory import ClipCost, plan_clip_frames
from dvis_trt.runtime.pipeline import TrackHub
from dvis_trt.runtime.postprocess import fg_scores


def _random_hub(seed=0, frames=40, c=8, k=5):
    rng = np.random.default_rng(seed)
    hub = TrackHub(c, k + 1)
    n_live = 0
    for t in range(frames):
        n_new = int(rng.integers(0, 4))
        rows = n_live + n_new
        valid = rng.random(rows) < 0.7
        hub.update(t, rng.normal(size=(rows, c)).astype(np.float32),
                   rng.normal(size=(rows, k + 1)).astype(np.float32) * 3,
                   rng.normal(size=(rows, c)).astype(np.float32), valid)
        n_live = hub.num_live
    return hub


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("topk", [1, 3, 8, 1000])
def test_select_before_densify_matches_densify_then_select(seed, topk):
    hub = _random_hub(seed)
    start, length = 5, 30
    ids, logits, inst = hub.clip_tracks(start, length, noise_frame_num=4)
    order = np.argsort(-fg_scores(logits), kind="stable")[:topk]
    sel_ids, sel_logits, sel_inst = hub.clip_tracks(start, length, 4, topk=topk, rank=fg_scores)
    assert len(ids) > 3
    np.testing.assert_array_equal(sel_ids, ids[order])
    np.testing.assert_array_equal(sel_logits, logits[order])
    np.testing.assert_array_equal(sel_inst, inst[:, order])
    assert sel_inst.shape == (length, min(topk, len(ids)), 8)


@dataclasses.dataclass
class _Cfg:  # the InferenceConfig fields the model reads (R50 OVIS values)
    hidden_dim: int = 256
    num_queries: int = 100
    num_new_ins: int = 100
    mask_dim: int = 256
    num_classes: int = 25
    offline_topk_num: int = 40
    max_num: int = 20


def _r50_cost():
    return ClipCost.for_video(_Cfg(), (360, 640), (480, 853), (480, 864), window=5,
                              weight_bytes=180 << 20)


def test_cost_model_counts_quadratic_attention_and_results():
    cost = _r50_cost()
    assert cost.per_frame2 == 3 * 8 * 100 * 4          # heads x queries x L^2, 3 live copies
    assert cost.per_frame > 256 * 120 * 216 * 4          # at least the mask features
    # results grow with the video and with the number of clips
    assert cost.results_bytes(2000, 100) > cost.results_bytes(2000, 1000) > \
        cost.results_bytes(1000, 1000)


@pytest.mark.parametrize("gb", [2.0, 4.0, 16.0])
def test_auto_plan_stays_under_the_budget(gb):
    cost = _r50_cost()
    budget = gb * (1 << 30)
    plans = {n: plan_clip_frames(cost, budget, n, min_frames=5) for n in (16, 250, 1000, 2000)}
    for n, (clip, fits) in plans.items():
        assert fits
        assert cost.peak_bytes(clip or n, n) <= budget
        if clip is None:
            assert cost.peak_bytes(n, n) <= budget
    # a short video that fits runs as one clip (official behaviour); a long one is cut
    assert plans[16][0] is None and plans[2000][0] is not None


def test_auto_plan_says_when_nothing_fits():
    cost = _r50_cost()
    clip, fits = plan_clip_frames(cost, 0.5 * (1 << 30), 1000, min_frames=5)
    assert not fits and clip >= 5
    clip, fits = plan_clip_frames(cost, 8 * (1 << 30), None, min_frames=5)   # unknown length
    assert fits and clip is not None and cost.fixed + cost.clip_bytes(clip) <= 8 * (1 << 30)
