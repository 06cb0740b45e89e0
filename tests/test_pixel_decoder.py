"""MSDeformAttn pixel decoder (``export/model/pixel_decoder.py``).

Independent checks: the official ``sem_seg_head.pixel_decoder.*`` state-dict rows of the R50
OVIS model; the deformable encoder against a float64 numpy re-implementation (vectorised
zero-padded bilinear sampling, its own LayerNorm / softmax / FFN); the FPN wiring with an empty
encoder against the formula written out with the decoder's own conv layers; reference points
against the official ``linspace`` formula; batch independence; dynamic-size ONNX export.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvis_trt.export.model.backbone import ShapeSpec
from dvis_trt.export.model.msda import MSDA_CUSTOM_OPSETS, PLUGIN_DOMAIN, msda_mode
from dvis_trt.export.model.pixel_decoder import (
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoderOnly,
    encoder_reference_points,
)

REF = Path(os.environ.get("DVIS_TRT_REFERENCE", "/work/shared/reference"))
R50_KEYS = REF / "dvis_daq_offline_r50_ovis.keys.tsv"
R50_YAML = REF / "dvis_daq_offline_r50_ovis.resolved.yaml"
needs_ref = pytest.mark.skipif(not (R50_KEYS.is_file() and R50_YAML.is_file()),
                               reason="reference data (DVIS_TRT_REFERENCE) not present")
PREFIX = "sem_seg_head.pixel_decoder."

# reduced config: 4 backbone levels with small channels, 2 encoder layers, 4 heads
SMALL_SHAPES = {"res2": ShapeSpec(24, 4), "res3": ShapeSpec(40, 8), "res4": ShapeSpec(48, 16),
                "res5": ShapeSpec(56, 32)}
SMALL = dict(conv_dim=64, mask_dim=32, norm="GN", transformer_dropout=0.0, transformer_nheads=4,
             transformer_dim_feedforward=96, transformer_enc_layers=2,
             transformer_in_features=["res3", "res4", "res5"], common_stride=4)


def small_decoder(seed=0, dtype=torch.float32, **over):
    torch.manual_seed(seed)
    dec = MSDeformAttnPixelDecoder(SMALL_SHAPES, **{**SMALL, **over}).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial offsets / attention (they are zero-initialised)
        for p in dec.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=dtype))
    return dec


def features(hw, n=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, s.channels, math.ceil(hw[0] / s.stride), math.ceil(hw[1] / s.stride),
                           generator=g, dtype=dtype) for k, s in SMALL_SHAPES.items()}


# ----------------------------------------------------------------------------- state dict
@needs_ref
def test_r50_state_dict_equals_official_rows():
    import yaml

    m = yaml.safe_load(R50_YAML.read_text())["MODEL"]
    ssh, mf = m["SEM_SEG_HEAD"], m["MASK_FORMER"]
    in_shape = {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    dec = MSDeformAttnPixelDecoder(
        {k: v for k, v in in_shape.items() if k in ssh["IN_FEATURES"]},
        conv_dim=ssh["CONVS_DIM"], mask_dim=ssh["MASK_DIM"], norm=ssh["NORM"],
        transformer_dropout=mf["DROPOUT"], transformer_nheads=mf["NHEADS"],
        transformer_dim_feedforward=1024,  # hard-coded by the official from_config
        transformer_enc_layers=ssh["TRANSFORMER_ENC_LAYERS"],
        transformer_in_features=ssh["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"],
        common_stride=ssh["COMMON_STRIDE"])
    want = []
    for line in R50_KEYS.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        if name.startswith(PREFIX):
            want.append((name[len(PREFIX):], tuple(int(x) for x in shape.split(",")), dtype))
    got = [(k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
           for k, v in dec.state_dict().items()]
    assert got == want  # names, shapes, dtypes, order (117 rows)
    # README of the reference data: pixel decoder 6,035,904 parameters
    assert sum(p.numel() for p in dec.parameters()) == 6_035_904
    assert dec.num_fpn_levels == 1 and dec.transformer_in_features == ["res3", "res4", "res5"]


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("hw", [(64, 96), (61, 83), (40, 32)])
def test_output_shapes(hw):
    dec = small_decoder()
    feats = features(hw, n=2)
    with torch.no_grad():
        mask_features, ms = dec(feats)
        mf2, coarse, ms2 = dec.forward_features(feats)
    assert mask_features.shape == (2, 32) + tuple(feats["res2"].shape[2:])
    assert [tuple(t.shape) for t in ms] == [(2, 64) + tuple(feats[k].shape[2:])
                                           for k in ("res5", "res4", "res3")]  # coarsest first
    assert torch.equal(mf2, mask_features) and torch.equal(coarse, ms[0])
    assert all(torch.isfinite(t).all() for t in [mask_features, *ms])


# ----------------------------------------------------------------------------- reference points
@pytest.mark.parametrize("sizes", [[(3, 5), (2, 3), (1, 2)], [(15, 27), (8, 14), (4, 7)]])
def test_reference_points_equal_official_formula(sizes):
    got = encoder_reference_points(sizes)
    assert got.shape == (1, sum(h * w for h, w in sizes), len(sizes), 2)
    # official get_reference_points with valid ratios 1 (no padding mask at inference)
    refs = []
    ones = torch.ones(1, len(sizes), 2)
    for lvl, (h, w) in enumerate(sizes):
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w),
                                indexing="ij")
        ry = ry.reshape(-1)[None] / (ones[:, None, lvl, 1] * torch.tensor(h))
        rx = rx.reshape(-1)[None] / (ones[:, None, lvl, 0] * torch.tensor(w))
        refs.append(torch.stack((rx, ry), -1))
    official = torch.cat(refs, 1)[:, :, None] * ones[:, None]
    assert torch.equal(got, official)  # bit-identical float32 values
    # and the meaning: pixel centres, x first
    h, w = sizes[0]
    assert torch.allclose(got[0, w + 2, 0], torch.tensor([2.5 / w, 1.5 / h]))


# ----------------------------------------------------------------------------- encoder numerics
def np_sample(img, x, y):
    """Zero-padded bilinear sample of img (H, W, D) at normalised x, y (K,) -> (K, D)."""
    h, w, _ = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    out = np.zeros((x.shape[0], img.shape[2]))
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - np.abs(px - xi)) * (1 - np.abs(py - yi))
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            out += np.where(ok, wgt, 0.0)[:, None] * img[np.clip(yi, 0, h - 1),
                                                          np.clip(xi, 0, w - 1)]
    return out


def np_layer_norm(x, ln):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * ln.weight.detach().numpy() + ln.bias.detach().numpy()


def np_linear(x, lin):
    return x @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()


def np_encoder(enc, srcs, poss):
    """srcs/poss: lists of (C, H, W) float64 arrays for one image, coarsest first."""
    sizes = [s.shape[1:] for s in srcs]
    level_embed = enc.level_embed.detach().numpy()
    x = np.concatenate([s.reshape(s.shape[0], -1).T for s in srcs])  # (S, C)
    pos = np.concatenate([p.reshape(p.shape[0], -1).T + level_embed[lvl]
                          for lvl, p in enumerate(poss)])
    starts = np.cumsum([0] + [h * w for h, w in sizes])
    # pixel centres (x, y); float32 like the official (and our) reference points
    f32 = np.float32
    ref = np.concatenate([np.stack(np.meshgrid((np.arange(w, dtype=f32) + f32(0.5)) / f32(w),
                                               (np.arange(h, dtype=f32) + f32(0.5)) / f32(h),
                                               indexing="xy"), -1).reshape(-1, 2)
                          for h, w in sizes]).astype(np.float64)  # (S, 2)
    for layer in enc.encoder.layers:
        att = layer.self_attn
        m, l_, p_ = att.n_heads, att.n_levels, att.n_points
        d = att.d_model // m
        q = x + pos
        value = np_linear(x, att.value_proj).reshape(-1, m, d)
        off = np_linear(q, att.sampling_offsets).reshape(-1, m, l_, p_, 2)
        logit = np_linear(q, att.attention_weights).reshape(-1, m, l_ * p_)
        aw = np.exp(logit - logit.max(-1, keepdims=True))
        aw = (aw / aw.sum(-1, keepdims=True)).reshape(-1, m, l_, p_)
        heads = np.zeros((x.shape[0], m, d))
        for head in range(m):
            for lvl, (h, w) in enumerate(sizes):
                img = value[starts[lvl]:starts[lvl + 1], head].reshape(h, w, d)
                for pt in range(p_):
                    lx = ref[:, 0] + off[:, head, lvl, pt, 0] / w
                    ly = ref[:, 1] + off[:, head, lvl, pt, 1] / h
                    heads[:, head] += aw[:, head, lvl, pt, None] * np_sample(img, lx, ly)
        x = np_layer_norm(x + np_linear(heads.reshape(x.shape[0], -1), att.output_proj),
                          layer.norm1)
        ffn = np_linear(np.maximum(np_linear(x, layer.linear1), 0.0), layer.linear2)
        x = np_layer_norm(x + ffn, layer.norm2)
    return x


def test_encoder_matches_numpy_float64():
    torch.manual_seed(0)
    enc = MSDeformAttnTransformerEncoderOnly(d_model=32, nhead=4, num_encoder_layers=2,
                                             dim_feedforward=48, dropout=0.0,
                                             num_feature_levels=3).double().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            # offsets up to a few pixels so that samples also fall outside the maps
            scale = 2.0 if "sampling_offsets" in name else 0.2
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    sizes = [(2, 3), (4, 5), (7, 9)]
    srcs = [torch.randn(2, 32, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    poss = [torch.randn(2, 32, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    for mode in ("eager", "onnx"):
        with msda_mode(mode), torch.no_grad():
            memory, shapes, start = enc(srcs, poss)
        assert shapes.tolist() == [list(s) for s in sizes]
        assert start.tolist() == [0, 6, 26]
        for b in range(2):
            want = np_encoder(enc, [s[b].numpy() for s in srcs], [p[b].numpy() for p in poss])
            # float64 on both sides, two layers: differences are rounding only (~1e-15)
            np.testing.assert_allclose(memory[b].numpy(), want, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- FPN wiring
def test_fpn_wiring_with_empty_encoder():
    # (the decoder casts features to float32 like the official ``.float()``: test in float32)
    dec = small_decoder(seed=3, transformer_enc_layers=0)
    feats = features((48, 80), n=2, seed=4)
    with torch.no_grad():
        mask_features, ms = dec(feats)
        # no encoder layer: the memory is the projected maps, split back per level
        o5 = dec.input_proj[0](feats["res5"])
        o4 = dec.input_proj[1](feats["res4"])
        o3 = dec.input_proj[2](feats["res3"])
        lat = dec.adapter_1(feats["res2"])
        o2 = dec.layer_1(lat + F.interpolate(o3, size=lat.shape[-2:], mode="bilinear",
                                             align_corners=False))
        want_mask = dec.mask_features(o2)
    # the same float32 kernels on the same data (flatten/cat/split move values only): the
    # results agree to rounding of identical computations (1e-6 on O(1) values)
    for got, want in zip(ms, [o5, o4, o3]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mask_features, want_mask, rtol=1e-6, atol=1e-6)
    assert (o2 >= 0).all()  # layer_1 ends in ReLU (official output_conv activation)


def test_batch_elements_are_independent():
    dec = small_decoder(seed=1)
    feats = features((40, 56), n=3, seed=2)
    with torch.no_grad():
        mask_all, ms_all = dec(feats)
        for b in range(3):
            mask_b, ms_b = dec({k: v[b:b + 1] for k, v in feats.items()})
            # GroupNorm/LayerNorm/MSDA are per sample; float32 kernels may block differently
            # for batch 1 vs 3 (rounding ~1e-7 on O(1) values): 1e-5, any mixing is O(0.1)
            torch.testing.assert_close(mask_all[b:b + 1], mask_b, rtol=1e-5, atol=1e-5)
            for a, c in zip(ms_all, ms_b):
                torch.testing.assert_close(a[b:b + 1], c, rtol=1e-5, atol=1e-5)


def test_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="multiple of 32"):
        MSDeformAttnPixelDecoder(SMALL_SHAPES, **{**SMALL, "conv_dim": 48})
    with pytest.raises(ValueError, match="not in input_shape"):
        MSDeformAttnPixelDecoder({k: v for k, v in SMALL_SHAPES.items() if k != "res5"},
                                 **SMALL)
    dec = small_decoder()
    feats = features((32, 32))
    del feats["res2"]
    with pytest.raises(ValueError, match="res2"):
        dec(feats)


# ----------------------------------------------------------------------------- ONNX
class _Wrap(torch.nn.Module):
    def __init__(self, dec):
        super().__init__()
        self.dec = dec

    def forward(self, res2, res3, res4, res5):
        mask_features, ms = self.dec({"res2": res2, "res3": res3, "res4": res4, "res5": res5})
        return (mask_features, *ms)


_IN = ["res2", "res3", "res4", "res5"]
_OUT = ["mask_features", "ms0", "ms1", "ms2"]


def _export(mode, dec, path):
    dyn = {k: {0: "T", 2: f"{k}_h", 3: f"{k}_w"} for k in _IN}
    with msda_mode(mode), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrap(dec), tuple(features((64, 96)).values()), str(path),
                          dynamo=False, opset_version=17, input_names=_IN, output_names=_OUT,
                          dynamic_axes=dyn,
                          custom_opsets=MSDA_CUSTOM_OPSETS if mode != "onnx" else None)


def test_onnx_export_is_dynamic_in_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    dec = small_decoder(seed=7)
    path = tmp_path / "pixel_decoder.onnx"
    _export("onnx", dec, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for hw, n in [((96, 160), 2), ((61, 83), 1)]:  # neither is the export size
        feats = features(hw, n=n, seed=hw[0])
        with torch.no_grad():
            want = _Wrap(dec)(*feats.values())
        got = sess.run(None, {k: v.numpy() for k, v in feats.items()})
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            # float32 convs / GroupNorm / 2 encoder layers in another library: observed
            # ~1e-6 on O(1) outputs; 1e-4 is a wide margin that still catches any mis-sample
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4)


def test_plugin_export_has_one_node_per_encoder_layer(tmp_path):
    onnx = pytest.importorskip("onnx")
    dec = small_decoder(seed=8)
    path = tmp_path / "pixel_decoder_plugin.onnx"
    _export("plugin", dec, path)
    nodes = onnx.load(str(path)).graph.node
    custom = [n for n in nodes if n.domain == PLUGIN_DOMAIN]
    assert len(custom) == SMALL["transformer_enc_layers"]
    assert "GridSample" not in [n.op_type for n in nodes]
