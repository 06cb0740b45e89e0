"""Tests of the frame decoder (``export/model/predictor.py``) and the sine position embedding.

The references below are written independently of ``export/model/layers.py``: they follow the
official ``VideoMultiScaleMaskedTransformerDecoder_dvisPlus`` step by step (boolean masks,
index assignment, ``nn.MultiheadAttention``, einsum, per-frame position embeddings).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvis_trt.export.model.layers import masked_attention_bias
from dvis_trt.export.model.position_encoding import PositionEmbeddingSine
from dvis_trt.export.model.predictor import VideoMultiScaleMaskedTransformerDecoder_dvisPlus

KEYS_TSV = Path("/work/shared/reference/dvis_daq_offline_r50_ovis.keys.tsv")
PREFIX = "sem_seg_head.predictor."

# R50 OVIS values, read off dvis_daq_offline_r50_ovis.resolved.yaml
# (DEC_LAYERS 10 -> 9 layers: from_config subtracts one).
R50_OVIS = dict(in_channels=256, num_classes=25, hidden_dim=256, num_queries=100, nheads=8,
                dim_feedforward=2048, dec_layers=9, pre_norm=False, mask_dim=256,
                enforce_input_project=False, num_reid_head_layers=3, reid_hidden_dim=256)

TINY = dict(in_channels=16, num_classes=5, hidden_dim=16, num_queries=6, nheads=2,
            dim_feedforward=24, dec_layers=4, pre_norm=False, mask_dim=12,
            enforce_input_project=False, num_reid_head_layers=3, reid_hidden_dim=20)


# ----------------------------------------------------------------------------- references
def ref_sine_pos(valid: np.ndarray, num_pos_feats: int, temperature: float = 10000.0,
                 scale: float = 2 * math.pi) -> np.ndarray:
    """Float64 loop version of the normalised DETR sine embedding. valid: (N,H,W) bool."""
    n, h, w = valid.shape
    out = np.zeros((n, 2 * num_pos_feats, h, w))
    for b in range(n):
        ycum = np.cumsum(valid[b], axis=0).astype(np.float64)
        xcum = np.cumsum(valid[b], axis=1).astype(np.float64)
        for i in range(h):
            for j in range(w):
                y = ycum[i, j] / (ycum[h - 1, j] + 1e-6) * scale
                x = xcum[i, j] / (xcum[i, w - 1] + 1e-6) * scale
                for k in range(num_pos_feats):
                    freq = temperature ** (2 * (k // 2) / num_pos_feats)
                    f = math.sin if k % 2 == 0 else math.cos
                    out[b, k, i, j] = f(y / freq)
                    out[b, num_pos_feats + k, i, j] = f(x / freq)
    return out


def ref_attn_mask(mask_logits_4d: torch.Tensor, size, nhead: int) -> torch.Tensor:
    """Official forward_prediction_heads + the loop's fix-up, verbatim semantics (bool)."""
    m = F.interpolate(mask_logits_4d, size=size, mode="bilinear", align_corners=False)
    m = (m.sigmoid().flatten(2).unsqueeze(1).repeat(1, nhead, 1, 1).flatten(0, 1) < 0.5).bool()
    m[torch.where(m.sum(-1) == m.shape[-1])] = False
    return m


class _RefSelf(nn.Module):
    def __init__(self, d, nh):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nh)
        self.norm = nn.LayerNorm(d)

    def forward(self, tgt, qpos, pre):
        if pre:
            t = self.norm(tgt)
            return tgt + self.self_attn(t + qpos, t + qpos, value=t)[0]
        return self.norm(tgt + self.self_attn(tgt + qpos, tgt + qpos, value=tgt)[0])


class _RefCross(nn.Module):
    def __init__(self, d, nh):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d, nh)
        self.norm = nn.LayerNorm(d)

    def forward(self, tgt, mem, mask, pos, qpos, pre):
        if pre:
            t = self.norm(tgt)
            return tgt + self.multihead_attn(t + qpos, mem + pos, value=mem, attn_mask=mask)[0]
        return self.norm(tgt + self.multihead_attn(tgt + qpos, mem + pos, value=mem,
                                                   attn_mask=mask)[0])


class _RefFFN(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.linear1 = nn.Linear(d, ff)
        self.linear2 = nn.Linear(ff, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, tgt, pre):
        if pre:
            return tgt + self.linear2(F.relu(self.linear1(self.norm(tgt))))
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class _RefMLP(nn.Module):
    def __init__(self, i, h, o, n):
        super().__init__()
        dims = [i] + [h] * (n - 1) + [o]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k + 1 < len(self.layers):
                x = F.relu(x)
        return x


class RefDecoder(nn.Module):
    """Straightforward transcription of the official dvisPlus inference forward."""

    def __init__(self, in_channels, num_classes, hidden_dim, num_queries, nheads,
                 dim_feedforward, dec_layers, pre_norm, mask_dim, enforce_input_project,
                 num_reid_head_layers, reid_hidden_dim):
        super().__init__()
        self.nh, self.pre, self.L = nheads, pre_norm, dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            _RefSelf(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            _RefCross(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            _RefFFN(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(3, hidden_dim)
        proj = in_channels != hidden_dim or enforce_input_project
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if proj else nn.Sequential() for _ in range(3))
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = _RefMLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.reid_embed = _RefMLP(hidden_dim, reid_hidden_dim, hidden_dim, num_reid_head_layers)
        self.blocked_fraction = []
        self.fixed_rows = 0

    def heads(self, output, mf, size):
        dec = self.decoder_norm(output).transpose(0, 1)
        cls = self.class_embed(dec)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(dec), mf)
        m = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        m = (m.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.nh, 1, 1).flatten(0, 1) < 0.5).bool()
        return cls, masks, m

    def forward(self, x, mf):
        src, pos, sizes = [], [], []
        for i in range(3):
            t, _, h, w = x[i].shape
            sizes.append((h, w))
            valid = np.ones((t, h, w), dtype=bool)
            p = torch.from_numpy(ref_sine_pos(valid, self.query_feat.weight.shape[1] // 2)).float()
            pos.append(p.flatten(2).permute(2, 0, 1))
            src.append((self.input_proj[i](x[i]).flatten(2)
                        + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        bs = src[0].shape[1]
        qe = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        out = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        cls, masks, am = self.heads(out, mf, sizes[0])
        for i in range(self.L):
            lvl = i % 3
            self.blocked_fraction.append(am.float().mean().item())
            full = am.sum(-1) == am.shape[-1]
            self.fixed_rows += int(full.sum())
            am[torch.where(full)] = False
            out = self.transformer_cross_attention_layers[i](out, src[lvl], am, pos[lvl], qe, self.pre)
            out = self.transformer_self_attention_layers[i](out, qe, self.pre)
            out = self.transformer_ffn_layers[i](out, self.pre)
            cls, masks, am = self.heads(out, mf, sizes[(i + 1) % 3])
        emb = self.decoder_norm(out)                                  # (Q, T, C)
        return cls, masks, emb.permute(1, 0, 2)


def make_inputs(cfg, t, level_sizes, mask_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(t, cfg["in_channels"], h, w, generator=g) for h, w in level_sizes]
    mf = torch.randn(t, cfg["mask_dim"], *mask_size, generator=g)
    return feats, mf


def tiny_predictor(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    model = VideoMultiScaleMaskedTransformerDecoder_dvisPlus(**cfg).eval()
    with torch.no_grad():
        # Spread the queries (random init collapses them onto one direction) and give the
        # mask head enough gain that masks are a mix of kept and blocked pixels.
        model.query_feat.weight.mul_(3.0)
        model.mask_embed.layers[-1].weight.mul_(3.0)
    return model


# ----------------------------------------------------------------------------- state dict
def test_state_dict_matches_official_r50_ovis():
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines() if line.startswith(PREFIX)]
    expected = [(name[len(PREFIX):], tuple(int(s) for s in shape.split(","))) for name, shape, _ in rows]
    model = VideoMultiScaleMaskedTransformerDecoder_dvisPlus(**R50_OVIS)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # same names, shapes and order
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    # README of the reference data: predictor 14,662,682 parameters.
    assert sum(p.numel() for p in model.parameters()) == 14_662_682


def test_input_proj_and_no_reid_variants():
    m = VideoMultiScaleMaskedTransformerDecoder_dvisPlus(**{**TINY, "in_channels": 8,
                                                            "num_reid_head_layers": 0})
    keys = m.state_dict().keys()
    assert {f"input_proj.{i}.weight" for i in range(3)} <= set(keys)
    assert m.input_proj[0].weight.shape == (16, 8, 1, 1)
    assert not any(k.startswith("reid_embed") for k in keys)
    with pytest.raises(ValueError, match="nheads"):
        VideoMultiScaleMaskedTransformerDecoder_dvisPlus(**{**TINY, "nheads": 3})


# ----------------------------------------------------------------------------- masked attention
def test_masked_attention_bias_matches_official_bool_mask():
    g = torch.Generator().manual_seed(1)
    b, q, h, w, nh = 3, 5, 4, 6, 4
    logits = torch.randn(b, q, h, w, generator=g)
    logits[0, 1] = -torch.rand(h, w, generator=g) - 0.1   # every key blocked -> row unmasked
    logits[2, 4] = -5.0
    logits[1, 0] = 0.0                                    # sigmoid == 0.5: not blocked
    logits[1, 2, 0, :3] = -1e-9                           # sigmoid rounds to 0.5: not blocked
    logits[1, 3] = 3.0                                    # nothing blocked
    expected = ref_attn_mask(logits, (h, w), nh)          # bool (b*nh, q, h*w)
    bias = masked_attention_bias(logits.flatten(2), nh)
    assert bias.shape == expected.shape and bias.dtype == torch.float32
    assert torch.equal(torch.isneginf(bias), expected)
    assert torch.all(bias[~expected] == 0)
    # The fixed-up rows really were all blocked before the rule (the test can fail).
    assert not expected[0 * nh:(0 + 1) * nh, 1].any() and not expected[2 * nh:3 * nh, 4].any()
    assert expected.any()
    # Per-head repeat is batch-major: row b*nh + head holds frame b's mask.
    for bi in range(b):
        for hd in range(nh):
            assert torch.equal(torch.isneginf(bias[bi * nh + hd]), expected[bi * nh])


# ----------------------------------------------------------------------------- position embedding
def test_position_embedding_matches_formula():
    pe = PositionEmbeddingSine(8, normalize=True)
    x = torch.zeros(2, 3, 5, 7)
    got = pe(x)
    assert got.shape == (2, 16, 5, 7) and got.dtype == torch.float32
    ref = ref_sine_pos(np.ones((2, 5, 7), dtype=bool), 8)
    # float32 arguments up to 2*pi: |sin/cos error| ~ 1e-6; 2e-6 leaves room for one ulp of
    # the argument (float32 vs the float64 reference).
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=2e-6)


def test_position_embedding_with_padding_mask():
    pe = PositionEmbeddingSine(4, normalize=True)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[0, 3:, :] = True
    mask[1, :, 4:] = True
    got = pe(torch.zeros(2, 1, 4, 6), mask)
    ref = ref_sine_pos((~mask).numpy(), 4)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=2e-6)  # as above


def test_position_embedding_unnormalised_and_errors():
    pe = PositionEmbeddingSine(4, normalize=False)
    got = pe(torch.zeros(1, 1, 3, 2))
    # un-normalised: row index 1..H directly; channel 0 of pos_y is sin(y / 1)
    np.testing.assert_allclose(got[0, 0, :, 0].numpy(), np.sin([1.0, 2.0, 3.0]), atol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        PositionEmbeddingSine(4, normalize=False, scale=1.0)
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine(4, normalize=True)(torch.zeros(1, 1, 3, 2), torch.zeros(1, 3, 3).bool())


# ----------------------------------------------------------------------------- decoder vs reference
@pytest.mark.parametrize("variant", [
    {},
    {"pre_norm": True, "in_channels": 10, "enforce_input_project": True, "dec_layers": 3},
])
def test_predictor_matches_reference(variant):
    cfg = {**TINY, **variant}
    model = tiny_predictor(cfg)
    ref = RefDecoder(**cfg).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    feats, mf = make_inputs(cfg, 3, [(2, 3), (4, 6), (8, 12)], (16, 24))
    with torch.no_grad():
        out = model(feats, mf)
        cls, masks, emb = ref(feats, mf)
    assert out["pred_logits"].shape == (3, cfg["num_queries"], cfg["num_classes"] + 1)
    assert out["pred_masks"].shape == (3, cfg["num_queries"], 16, 24)
    assert out["pred_embds"].shape == (3, cfg["num_queries"], cfg["hidden_dim"])
    # Same float32 arithmetic up to summation order (matmul vs einsum, broadcast position
    # embedding): differences are a few ulps; 1e-5 would catch any semantic slip
    # (a flipped mask pixel or a missing layer changes outputs by >1e-2).
    torch.testing.assert_close(out["pred_logits"], cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred_masks"], masks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred_embds"], emb, rtol=1e-5, atol=1e-5)
    # The masks were neither trivially all-open nor all-blocked.
    frac = np.array(ref.blocked_fraction)
    assert (frac > 0.05).any() and (frac < 0.95).all(), frac


def test_all_blocked_rule_inside_decoder():
    """A mask-feature map that blocks everything for every query: the rule must unmask."""
    cfg = TINY
    model = tiny_predictor(cfg)
    ref = RefDecoder(**cfg).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    feats, _ = make_inputs(cfg, 2, [(2, 3), (4, 6), (8, 12)], (16, 24), seed=3)
    with torch.no_grad():
        # mask logits = mask_embed(q) . mf; with mf = -1 on channel 0 and 0 elsewhere and
        # the mask head's channel-0 bias at +50, every logit is about -50: every key of every
        # query is blocked at every layer.
        model.mask_embed.layers[-1].bias[0] = 50.0
        ref.load_state_dict(model.state_dict(), strict=True)
        mf = torch.zeros(2, cfg["mask_dim"], 16, 24)
        mf[:, 0] = -1.0
        out = model(feats, mf)
        cls, masks, emb = ref(feats, mf)
    assert ref.fixed_rows > 0
    assert torch.isfinite(out["pred_embds"]).all()
    torch.testing.assert_close(out["pred_embds"], emb, rtol=1e-5, atol=1e-5)  # as above
    torch.testing.assert_close(out["pred_logits"], cls, rtol=1e-5, atol=1e-5)


def test_frames_are_independent():
    model = tiny_predictor()
    feats, mf = make_inputs(TINY, 3, [(2, 3), (4, 6), (8, 12)], (16, 24), seed=5)
    with torch.no_grad():
        together = model(feats, mf)
        alone = [model([f[t:t + 1] for f in feats], mf[t:t + 1]) for t in range(3)]
    for key in ("pred_logits", "pred_masks", "pred_embds"):
        stacked = torch.cat([a[key] for a in alone])
        # batched vs single-sample kernels differ only in blocking: a few ulps.
        torch.testing.assert_close(together[key], stacked, rtol=1e-5, atol=1e-5)
    # and the frames do differ (else the check above is vacuous)
    assert (together["pred_embds"][0] - together["pred_embds"][1]).abs().max() > 1e-3


def test_bad_inputs():
    model = tiny_predictor()
    feats, mf = make_inputs(TINY, 1, [(2, 3), (4, 6), (8, 12)], (16, 24))
    with pytest.raises(ValueError, match="levels"):
        model(feats[:2], mf)


# ----------------------------------------------------------------------------- ONNX
class _Wrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, f0, f1, f2, mf):
        out = self.m([f0, f1, f2], mf)
        return out["pred_logits"], out["pred_masks"], out["pred_embds"]


def test_onnx_export_dynamic_shapes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _Wrap(tiny_predictor()).eval()
    feats, mf = make_inputs(TINY, 2, [(2, 3), (4, 6), (8, 12)], (16, 24))
    path = tmp_path / "predictor.onnx"
    names = ["f0", "f1", "f2", "mask_features"]
    dyn = {n: {0: "T", 2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(names)}
    dyn.update({"pred_logits": {0: "T"}, "pred_masks": {0: "T", 2: "h", 3: "w"},
                "pred_embds": {0: "T"}})
    with torch.no_grad():
        torch.onnx.export(model, (*feats, mf), str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["pred_logits", "pred_masks", "pred_embds"],
                          dynamic_axes=dyn)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, sizes, msize, seed in [(2, [(2, 3), (4, 6), (8, 12)], (16, 24), 11),
                                  (3, [(3, 4), (6, 8), (12, 16)], (24, 32), 12)]:
        feats, mf = make_inputs(TINY, t, sizes, msize, seed=seed)
        with torch.no_grad():
            expected = model(*feats, mf)
        got = sess.run(None, {n: a.numpy() for n, a in zip(names, (*feats, mf))})
        for e, g in zip(expected, got):
            assert g.shape == tuple(e.shape)
            # ORT kernels vs torch kernels (different GEMM/softmax blocking): ~1e-6 relative;
            # 1e-4 still catches a baked-in shape or a wrong mask (errors of order 1e-1).
            np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_predictor_matches_reference_r50_dims():
    """R50 OVIS dimensions (9 layers, 100 queries, 8 heads) on a 192x256 padded frame."""
    model = tiny_predictor(R50_OVIS)
    ref = RefDecoder(**R50_OVIS).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    feats, mf = make_inputs(R50_OVIS, 2, [(6, 8), (12, 16), (24, 32)], (48, 64), seed=7)
    with torch.no_grad():
        out = model(feats, mf)
        cls, masks, emb = ref(feats, mf)
    # Larger sums (256 channels) than the tiny test: a few more ulps, still far below the
    # effect of any semantic difference.
    torch.testing.assert_close(out["pred_logits"], cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["pred_masks"], masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["pred_embds"], emb, rtol=1e-4, atol=1e-4)
    frac = np.array(ref.blocked_fraction)
    assert (frac > 0.05).any() and (frac < 0.95).all(), frac
