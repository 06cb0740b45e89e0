"""Tests of the segmenter stage (``export/model/segmenter.py``).

The backbone and pixel decoder are small stand-ins with the stage contract of runtime/bundle/stages.py, so these
tests check the stage's wiring, the mask pooling and the export, not the other modules.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvis_trt.export.model.predictor import VideoMultiScaleMaskedTransformerDecoder_dvisPlus
from dvis_trt.export.model.segmenter import SemSegHead, Segmenter, mask_pool

TINY = dict(in_channels=16, num_classes=5, hidden_dim=16, num_queries=6, nheads=2,
            dim_feedforward=24, dec_layers=3, pre_norm=False, mask_dim=12,
            enforce_input_project=False, num_reid_head_layers=3, reid_hidden_dim=16)


class StandInBackbone(nn.Module):
    """(N,3,H,W) -> {"res2".."res5"} at strides 4..32 (interface of backbone.ResNet)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(3))

    def forward(self, x):
        out = {}
        x = torch.relu(self.stem(x))
        out["res2"] = x
        for i, conv in enumerate(self.down):
            x = torch.relu(conv(x))
            out[f"res{i + 3}"] = x
        return out


class StandInPixelDecoder(nn.Module):
    """features -> (mask_features (N,mask_dim,H/4,W/4), [res5, res4, res3] projected)."""

    def __init__(self, conv_dim, mask_dim):
        super().__init__()
        self.lat = nn.ModuleList(nn.Conv2d(8, conv_dim, 1) for _ in range(3))
        self.mask_features = nn.Conv2d(8, mask_dim, 1)

    def forward(self, features):
        ms = [self.lat[i](features[name]) for i, name in enumerate(("res5", "res4", "res3"))]
        up = F.interpolate(ms[-1][:, :8], scale_factor=2.0, mode="nearest")
        return self.mask_features(features["res2"] + up), ms


def tiny_segmenter(seed=0):
    torch.manual_seed(seed)
    pred = VideoMultiScaleMaskedTransformerDecoder_dvisPlus(**TINY)
    with torch.no_grad():
        pred.query_feat.weight.mul_(3.0)
        pred.mask_embed.layers[-1].weight.mul_(3.0)
    head = SemSegHead(StandInPixelDecoder(TINY["in_channels"], TINY["mask_dim"]), pred)
    return Segmenter(StandInBackbone(), head).eval()


def loop_mask_pool(pred_masks, mask_features):
    """Direct per-(frame, query) loop over the official formula."""
    t, q = pred_masks.shape[:2]
    c = mask_features.shape[1]
    out = torch.zeros(t, q, c, dtype=torch.float64)
    for ti in range(t):
        for qi in range(q):
            sel = pred_masks[ti, qi].sigmoid() > 0.5
            feats = mask_features[ti].double()[:, sel]          # (C, n)
            out[ti, qi] = feats.sum(-1) / (int(sel.sum()) + 1e-8)
    return out


def test_mask_pool_matches_loop():
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(3, 5, 7, 9, generator=g)
    masks[0, 2] = -1.0                    # empty mask -> zeros
    masks[1, 3] = 0.0                     # sigmoid == 0.5 exactly: not selected -> empty
    masks[2, 0] = 2.0                     # full mask
    feats = torch.randn(3, 4, 7, 9, generator=g)
    got = mask_pool(masks, feats)
    ref = loop_mask_pool(masks, feats)
    assert got.shape == (3, 5, 4) and got.dtype == torch.float32
    # float32 matmul vs float64 loop over <= 63 pixels: ~1e-6.
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.all(got[0, 2] == 0) and torch.all(got[1, 3] == 0)
    torch.testing.assert_close(got[2, 0], feats[2].mean((1, 2)), rtol=1e-5, atol=1e-5)


def test_mask_pool_half_precision_empty_mask_is_zero():
    masks = torch.full((1, 2, 4, 4), -3.0, dtype=torch.float16)
    masks[0, 1, :2] = 3.0
    feats = torch.randn(1, 3, 4, 4).half()
    got = mask_pool(masks, feats)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert torch.all(got[0, 0] == 0)
    torch.testing.assert_close(got[0, 1].float(), feats[0, :, :2].float().mean((1, 2)),
                               rtol=1e-3, atol=1e-3)  # fp16 output rounding


def test_mask_pool_bad_shapes():
    with pytest.raises(ValueError, match="mask_pool"):
        mask_pool(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 5))


def test_segmenter_outputs_and_wiring():
    seg = tiny_segmenter()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        mask_features, frame_embeds, pred_logits, pred_masks, mask_pooled = seg(images)
        # independent composition: backbone -> pixel decoder -> predictor, loop pooling
        feats = seg.backbone(images)
        mf, ms = seg.sem_seg_head.pixel_decoder(feats)
        pred = seg.sem_seg_head.predictor(ms, mf)
    assert mask_features.shape == (2, TINY["mask_dim"], 16, 24)
    assert frame_embeds.shape == (2, TINY["num_queries"], TINY["hidden_dim"])
    assert pred_logits.shape == (2, TINY["num_queries"], TINY["num_classes"] + 1)
    assert pred_masks.shape == (2, TINY["num_queries"], 16, 24)
    assert mask_pooled.shape == (2, TINY["num_queries"], TINY["mask_dim"])
    assert torch.equal(mask_features, mf)
    assert torch.equal(frame_embeds, pred["pred_embds"])
    assert torch.equal(pred_logits, pred["pred_logits"])
    assert torch.equal(pred_masks, pred["pred_masks"])
    torch.testing.assert_close(mask_pooled.double(), loop_mask_pool(pred_masks, mf),
                               rtol=1e-5, atol=1e-5)  # float32 vs float64 sums, as above
    # the pooled features are non-trivial (some masks neither empty nor full)
    frac = (pred_masks.sigmoid() > 0.5).float().mean((2, 3))
    assert ((frac > 0) & (frac < 1)).any()


def test_state_dict_prefixes_and_names():
    seg = tiny_segmenter()
    keys = list(seg.state_dict())
    assert any(k.startswith("sem_seg_head.predictor.query_feat") for k in keys)
    assert any(k.startswith("sem_seg_head.pixel_decoder.") for k in keys)
    assert any(k.startswith("backbone.") for k in keys)
    assert Segmenter.OUTPUT_NAMES == ("mask_features", "frame_embeds", "pred_logits",
                                      "pred_masks", "mask_pooled")
    assert seg.sem_seg_head.num_classes == TINY["num_classes"]


def test_bad_inputs():
    seg = tiny_segmenter()
    with pytest.raises(ValueError, match="images"):
        seg(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="TRANSFORMER_IN_FEATURE"):
        SemSegHead(nn.Identity(), nn.Identity(), transformer_in_feature="res5")


def test_segmenter_onnx_export_two_resolutions(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    seg = tiny_segmenter()
    path = tmp_path / "segmenter.onnx"
    dyn = {"images": {0: "T", 2: "Hp", 3: "Wp"},
           "mask_features": {0: "T", 2: "h", 3: "w"}, "frame_embeds": {0: "T"},
           "pred_logits": {0: "T"}, "pred_masks": {0: "T", 2: "h", 3: "w"},
           "mask_pooled": {0: "T"}}
    with torch.no_grad():
        torch.onnx.export(seg, (torch.randn(2, 3, 64, 96),), str(path), dynamo=False,
                          opset_version=17, input_names=list(Segmenter.INPUT_NAMES),
                          output_names=list(Segmenter.OUTPUT_NAMES), dynamic_axes=dyn)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape, seed in [((2, 3, 64, 96), 1), ((3, 3, 96, 128), 2)]:
        images = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = seg(images)
        got = sess.run(None, {"images": images.numpy()})
        for name, e, g in zip(Segmenter.OUTPUT_NAMES, expected, got):
            assert g.shape == tuple(e.shape), name
            # ORT vs torch kernels: ~1e-6 relative; 1e-4 catches any shape/wiring error.
            # mask_pooled could jump if a mask logit sits within 1e-6 of 0; the seeds are fixed.
            np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_r50_ovis_state_dict_matches_official():
    """With the real backbone and pixel decoder (R50 OVIS values), the stage's state dict is
    exactly the official ``backbone.*`` + ``sem_seg_head.*`` rows (names and shapes)."""
    backbone_mod = pytest.importorskip("dvis_trt.export.model.backbone")
    pixel_mod = pytest.importorskip("dvis_trt.export.model.pixel_decoder")
    from pathlib import Path
    tsv = Path("/work/shared/reference/dvis_daq_offline_r50_ovis.keys.tsv")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    expected = {n: tuple(int(s) for s in shape.split(",")) for n, shape, _ in rows
                if n.startswith(("backbone.", "sem_seg_head."))}
    backbone = backbone_mod.build_resnet(50)
    pixel_decoder = pixel_mod.MSDeformAttnPixelDecoder(backbone.output_shape(), conv_dim=256,
                                                       mask_dim=256, norm="GN",
                                                       transformer_enc_layers=6)
    predictor = VideoMultiScaleMaskedTransformerDecoder_dvisPlus(
        in_channels=256, num_classes=25, hidden_dim=256, num_queries=100, nheads=8,
        dim_feedforward=2048, dec_layers=9, pre_norm=False, mask_dim=256,
        enforce_input_project=False, num_reid_head_layers=3, reid_hidden_dim=256)
    seg = Segmenter(backbone, SemSegHead(pixel_decoder, predictor))
    got = {k: tuple(v.shape) for k, v in seg.state_dict().items()}
    assert got == expected
