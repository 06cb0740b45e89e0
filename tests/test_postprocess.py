"""Host post-processing against the official torch semantics (torch used as the reference)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvis_trt.export.model.dvis_daq import minvis_match
from dvis_trt.runtime.postprocess import MaskUpsampler, minvis_link, select_topk


@pytest.mark.parametrize("sizes", [
    # (h, w) quarter-res, (Hp, Wp), (h_img, w_img), (H, W) original
    ((120, 216), (480, 864), (480, 853), (360, 640)),
    ((8, 16), (32, 64), (27, 61), (83, 125)),     # odd crop, upscaling to the original
    ((16, 8), (64, 32), (64, 29), (20, 9)),       # portrait, shrinking
])
def test_mask_upsampler_matches_torch_interpolate(sizes):
    (h, w), padded, img, out = sizes
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, h, w, generator=g) * 4
    ref = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
    ref = ref[:, :, :img[0], :img[1]]
    ref = F.interpolate(ref, size=out, mode="bilinear", align_corners=False)
    got = MaskUpsampler(intra_op_threads=1)(logits.numpy(), padded, img, out)
    assert got.shape == (3, 2, *out) and got.dtype == bool
    # ORT and torch round the source coordinate differently in the last bit; only pixels whose
    # value is within float noise of 0 may flip. Allow at most 1e-4 of the pixels.
    mismatch = (got != (ref > 0).numpy())
    close = ref.abs().numpy() < 1e-3
    assert not (mismatch & ~close).any()
    assert mismatch.mean() <= 1e-4


def test_select_topk_allows_one_query_two_labels_and_sorts():
    logits = np.full((3, 4), -10.0, dtype=np.float32)  # K = 3 classes + no-object
    logits[1, 0] = 5.0
    logits[1, 2] = 4.9
    logits[2, 1] = 3.0
    scores, labels, query = select_topk(logits, 3)
    p = torch.softmax(torch.from_numpy(logits), -1)[:, :-1].flatten()
    ref_vals, ref_idx = torch.topk(p, 3)
    np.testing.assert_allclose(scores, ref_vals.numpy(), rtol=1e-6)
    assert list(query) == list((ref_idx // 3).numpy()) == [2, 1, 1]
    assert list(labels) == list((ref_idx % 3).numpy()) == [1, 0, 2]


def test_minvis_link_matches_official_style_loop():
    rng = np.random.default_rng(0)
    t, q, c, k = 5, 7, 6, 4
    base = rng.normal(size=(q, c)).astype(np.float32)
    embeds, logits = [], []
    for i in range(t):  # each frame is a shuffled, noisy copy of the same queries
        perm = rng.permutation(q)
        embeds.append(base[perm] + 0.05 * rng.normal(size=(q, c)).astype(np.float32))
        logits.append(rng.normal(size=(q, k)).astype(np.float32))
    fe, lg = np.stack(embeds), np.stack(logits)
    mean_logits, linked = minvis_link(fe, lg)
    # reference: official loop written with torch and the official-style matcher
    out_e, out_l = [torch.from_numpy(fe[0])], [torch.from_numpy(lg[0])]
    for i in range(1, t):
        idx = minvis_match(out_e[-1], torch.from_numpy(fe[i]))
        out_e.append(torch.from_numpy(fe[i])[idx])
        out_l.append(torch.from_numpy(lg[i])[idx])
    np.testing.assert_array_equal(linked, torch.stack(out_e).numpy())
    np.testing.assert_allclose(mean_logits, (sum(out_l) / t).numpy(), rtol=1e-6, atol=1e-6)
    # the link recovers the identity of the shuffled queries
    for i in range(1, t):
        assert np.abs(linked[i] - linked[0]).max() < 0.5


def test_shipped_upsample_graph_is_the_generated_one():
    from pathlib import Path

    from dvis_trt.runtime import postprocess

    shipped = Path(postprocess.__file__).with_name(postprocess.MASK_UPSAMPLE_GRAPH)
    assert shipped.read_bytes() == postprocess._resize_graph_bytes()
