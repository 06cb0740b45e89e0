"""ViT-Adapter-L backbone port (``export/model/vit_adapter.py``) and the ViT configs.

- the whole ViT-L OVIS model's ``state_dict()`` equals the official key list (1,257 rows:
  names, shapes, order), built from the official config chain and from the packaged one;
- every official ViT-Adapter-L offline config resolves and builds;
- the exported position-embedding resize (Gather/Mul/Add, :func:`resize_pos_embed`) against the
  official ``F.interpolate(..., scale_factor=(g + 0.1) / 37, mode="bicubic")`` for every padded
  size from 32 to 1344 px in both orientations, and through ONNX Runtime;
- output strides / channels of the reduced ViT at a landscape and a portrait size;
- bad input: a non-``vitl`` adapter name, R50 weights for a ViT config and the reverse, ViT
  weights without the adapter -- one line each.

Parity with the official modules themselves was measured outside the repository (the closing
note of issue 10); the end-to-end test is ``tests/test_e2e_vit.py``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from dvis_trt.export.model.build import build_model  # noqa: E402
from dvis_trt.export.model.dinov2 import official_pos_embed, resize_pos_embed  # noqa: E402
from dvis_trt.export.model.vit_adapter import D2VitAdapterDinoV2, VitAdapterSpec  # noqa: E402
from dvis_trt.export.config import load_config  # noqa: E402
from dvis_trt.errors import CheckpointError, InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PKG_CONFIGS = ROOT / "export" / "configs"
TINY_VIT = PKG_CONFIGS / "tiny_vit.yaml"
REF = Path(os.environ.get("DVIS_TRT_REFERENCE", "/work/shared/reference"))
VITL_KEYS = REF / "dvis_daq_offline_vitl_ovis.keys.tsv"
OFFICIAL = {name: REF / "configs" / "dvis_daq" / name / "vit_adapter" / "DAQ_Offline_VitAdapterL.yaml"
            for name in ("ovis", "ytvis19", "ytvis21")}
needs_ref = pytest.mark.skipif(not VITL_KEYS.is_file() or not OFFICIAL["ovis"].is_file(),
                               reason="shared/reference not present")
NUM_CLASSES = {"ovis": 25, "ytvis19": 40, "ytvis21": 40}


def _keys_tsv():
    rows = []
    for line in VITL_KEYS.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(x) for x in shape.split(",")) if shape else (), dtype))
    return rows


def _meta_model(cfg):
    with torch.device("meta"):
        return build_model(cfg)


# ------------------------------------------------------------------------------- state dict
@needs_ref
@pytest.mark.parametrize("source", ["official", "packaged"])
def test_vitl_state_dict_equals_official_key_list(source):
    path = OFFICIAL["ovis"] if source == "official" else PKG_CONFIGS / "dvis_daq_offline_vitl_ovis.yaml"
    model = _meta_model(load_config(path))
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in model.state_dict().items()]
    ref = _keys_tsv()
    assert len(ours) == len(ref) == 1257
    assert ours == ref  # names, shapes, dtypes and order
    bb = model.backbone
    assert isinstance(bb, D2VitAdapterDinoV2)
    assert len(bb.vit_module.blocks) == 24 and bb.spec.interaction_indexes[-1] == (18, 23)
    assert bb.interactions[3].extra_extractors is not None
    assert all(i.extra_extractors is None for i in list(bb.interactions)[:3])
    attn = bb.interactions[0].extractor.attn
    assert (attn.n_levels, attn.n_heads, attn.n_points, attn.d_model) == (1, 16, 4, 1024)
    assert model.sem_seg_head.predictor.num_queries == 200
    assert model.tracker.num_new_ins == 200 if hasattr(model.tracker, "num_new_ins") else True
    assert any("conv_short_aggregate" in k for k, _, _ in ours)  # refiner local attention


@needs_ref
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_official_vitl_offline_config_resolves_and_builds(name):
    cfg = load_config(OFFICIAL[name])
    assert cfg.MODEL.BACKBONE.NAME == "D2VitAdapterDinoV2"
    model = _meta_model(cfg)
    sd = model.state_dict()
    # ytvis19 does not set USE_LOCAL_ATTN (ovis and ytvis21 do): 36 fewer refiner rows
    local = bool(cfg.MODEL.VIDEO_HEAD.USE_LOCAL_ATTN)
    assert local == (name != "ytvis19")
    assert len(sd) == (1257 if local else 1221)
    assert sum(k.startswith("backbone.") for k in sd) == 530
    assert tuple(sd["sem_seg_head.predictor.class_embed.weight"].shape) == (NUM_CLASSES[name] + 1, 256)
    assert tuple(sd["backbone.vit_module.pos_embed"].shape) == (1, 1370, 1024)


@needs_ref
def test_packaged_vitl_config_resolves_like_the_official_chain():
    a = load_config(OFFICIAL["ovis"]).to_dict()["MODEL"]
    b = load_config(PKG_CONFIGS / "dvis_daq_offline_vitl_ovis.yaml").to_dict()["MODEL"]
    a.pop("WEIGHTS"), b.pop("WEIGHTS")
    assert a == b


# -------------------------------------------------------------------- position embedding
def _sizes():
    for h in range(32, 1345, 32):
        for w in (h, 864, 32, 1344, 480):
            yield h, w
            yield w, h


def test_exported_pos_embed_resize_matches_the_official_bicubic_for_every_size():
    """Same source coordinates (the +0.1 scale), taps and weights as PyTorch's kernel; the only
    difference is float32 rounding (PyTorch's kernel contracts multiply-adds into FMAs).
    Bound: 4e-6 of the table's magnitude (observed ~3e-6 on N(0,1) values)."""
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 1 + 37 * 37, 8, generator=g)
    scale = pe.abs().max().item()
    worst = 0.0
    for h, w in _sizes():
        want = official_pos_embed(pe, h, w, 16, 37)
        got = resize_pos_embed(pe, h // 16, w // 16, 37)
        assert got.shape == want.shape == (1, 1 + (h // 16) * (w // 16), 8)
        worst = max(worst, (got - want).abs().max().item() / scale)
    assert worst < 4e-6, worst
    # a plain Resize to the output size (scale g/37 instead of (g+0.1)/37) is visibly different
    naive = F.interpolate(pe[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(30, 54),
                          mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert (naive - official_pos_embed(pe, 480, 864, 16, 37)[:, 1:]).abs().max() > 1e-2


def test_pos_embed_unchanged_for_the_pretraining_grid_on_a_square_input():
    pe = torch.randn(1, 1 + 37 * 37, 4)
    assert official_pos_embed(pe, 592, 592, 16, 37) is pe
    assert official_pos_embed(pe, 592, 608, 16, 37).shape == (1, 1 + 37 * 38, 4)


def test_pos_embed_resize_is_dynamic_in_onnx(tmp_path):
    """One exported graph, every grid size: ONNX Runtime vs the official bicubic."""
    ort = pytest.importorskip("onnxruntime")

    class PosOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = D2VitAdapterDinoV2(VitAdapterSpec(
                embed_dim=16, depth=1, num_heads=2, deform_num_heads=2, conv_inplane=4,
                interaction_indexes=[(0, 0)])).vit_module

        def forward(self, images):
            tokens, _, _ = self.vit.prepare_tokens(images)
            return tokens

    m = PosOnly().eval()
    path = tmp_path / "pos.onnx"
    torch.onnx.export(m, (torch.zeros(1, 3, 64, 96),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["tokens"],
                      dynamic_axes={"images": {2: "H", 3: "W"}, "tokens": {1: "L"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in ((480, 864), (864, 480), (96, 32), (1344, 768)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            want = m(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("size", [(96, 160), (160, 64)])
def test_reduced_vit_outputs_four_maps_at_strides_4_to_32(size):
    cfg = load_config(TINY_VIT)
    model = build_model(cfg)
    bb = model.backbone
    assert bb.spec.depth == 4 and bb.spec.embed_dim == 64
    shapes = bb.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (64, 4), "res3": (64, 8), "res4": (64, 16), "res5": (64, 32)}
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = bb(x)
    for k, s in (("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)):
        assert tuple(out[k].shape) == (2, 64, size[0] // s, size[1] // s)
        assert torch.isfinite(out[k]).all()
    # frames are independent (batch = frames)
    with torch.no_grad():
        one = bb(x[1:])
    torch.testing.assert_close(one["res3"][0], out["res3"][1], rtol=1e-4, atol=1e-5)


def test_input_not_a_multiple_of_32_is_refused():
    bb = build_model(load_config(TINY_VIT)).backbone
    with pytest.raises(ValueError, match="multiples of 32"):
        bb(torch.zeros(1, 3, 96, 80))


# ---------------------------------------------------------------------------- bad input
def test_vos_task_is_refused_in_one_line():
    """``vos/mose_vitl_offline.yaml`` sets TEST.TASK 'vos': the official inference then matches
    predictions to each video's first-frame object masks, an input dvis-trt does not take."""
    cfg = load_config(TINY_VIT, ["MODEL.MASK_FORMER.TEST.TASK=vos"])
    with pytest.raises(InputError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "'vos'" in msg and "TASK=vis" in msg


def test_adapter_name_other_than_vitl_is_one_line():
    cfg = load_config(TINY_VIT, ["MODEL.VIT_ADAPTER.NAME=vitb"])
    with pytest.raises(InputError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "'vitb'" in msg and "vitl" in msg


def test_unknown_reduction_key_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"_BASE_: {TINY_VIT}\nDVIS_TRT:\n  VIT_ADAPTER:\n    WIDTH: 3\n")
    cfg = load_config(path)
    with pytest.raises(InputError, match="DVIS_TRT.VIT_ADAPTER.WIDTH"):
        build_model(cfg)


def _state(config, seed=0, **kw):
    from dvis_trt.export.testing import build_test_model
    return build_test_model(load_config(config, **kw), seed=seed, spread=False).state_dict()


@pytest.fixture(scope="module")
def tiny_vit_state():
    return _state(TINY_VIT)


@pytest.fixture(scope="module")
def tiny_r50_state():
    return _state(PKG_CONFIGS / "tiny.yaml")


def _load_error(config, state, tmp_path, name):
    from dvis_trt.export.checkpoint import load_checkpoint

    path = tmp_path / name
    torch.save({"model": state}, path)
    model = build_model(load_config(config))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, path, strict=True, config_name=str(config))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_vit_checkpoint_with_r50_config_says_so(tiny_vit_state, tmp_path):
    msg = _load_error(PKG_CONFIGS / "tiny.yaml", tiny_vit_state, tmp_path, "vit.pth")
    assert "ViT-Adapter" in msg and "ResNet" in msg and "vit_adapter" in msg


def test_r50_checkpoint_with_vit_config_says_so(tiny_r50_state, tmp_path):
    msg = _load_error(TINY_VIT, tiny_r50_state, tmp_path, "r50.pth")
    assert "ResNet" in msg and "ViT-Adapter" in msg


def test_vit_checkpoint_without_the_adapter_says_so(tiny_vit_state, tmp_path):
    state = {k: v for k, v in tiny_vit_state.items()
             if not k.startswith("backbone.") or k.startswith("backbone.vit_module.")}
    msg = _load_error(TINY_VIT, state, tmp_path, "no_adapter.pth")
    assert "adapter" in msg and "backbone.spm" in msg


# ---------------------------------------------------------------------- TensorRT profiles
def test_vitl_segmenter_profiles_landscape_and_portrait_multiples_of_32():
    """Optimization profiles of a ViT-L OVIS bundle (no TensorRT needed): one exact profile per
    padded size in both orientations plus the covering one; every Hp, Wp a multiple of 32 (the
    adapter's per-level depth-wise conv needs even /16 grids); 200 queries, 200 new-instance
    queries and up to 400 live tracks in the tracker's profile."""
    from dvis_trt.engine import profiles as P
    from dvis_trt.runtime import bundle as M
    from dvis_trt.export.config import inference_values

    values = inference_values(load_config(PKG_CONFIGS / "dvis_daq_offline_vitl_ovis.yaml"))
    cfg = M.InferenceConfig.from_dict(values)
    d = cfg.dims
    assert (d["Q"], d["N"]) == (200, 200) and cfg.size_divisibility == 32
    specs = M.stage_specs(d["Q"], d["C"], d["K"], d["N"], d["S"], d["D"])
    man = M.BundleManifest(config=cfg, stages={
        n: M.StageSpec(n, f"{n}.onnx", "0" * 64, i, o) for n, (i, o) in specs.items()})
    profiles = P.derive_profiles(man, P.BuildLimits(resolutions=("360p", "720p", "1080p")))
    seg = profiles["segmenter"]
    assert [p.name for p in seg] == ["480x864", "864x480", "range"]
    for p in seg:
        for shape in p.shapes["images"]:
            t, c, hp, wp = shape
            assert c == 3 and hp % 32 == 0 and wp % 32 == 0 and 1 <= t <= 5
    assert seg[0].shapes["images"][1] == (5, 3, 480, 864)   # opt: a full window, landscape
    assert seg[1].shapes["images"][1] == (5, 3, 864, 480)   # portrait phone video
    step = profiles["tracker_step"][0].shapes["track_queries"]
    assert step[2] == (400, 256)
    assert profiles["refiner"][0].shapes["instance_embeds"][1][1] == 200
