"""The whole PyTorch port: official state-dict layout, strict loading, eager inference."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dvis_trt.export.checkpoint import load_checkpoint
from dvis_trt.export.model.build import build_model
from dvis_trt.export.testing import build_test_model
from dvis_trt.export.config import load_config
from dvis_trt.errors import CheckpointError, InputError
from dvis_trt.runtime.synthetic import render_scene

PKG_CONFIGS = Path(__file__).resolve().parents[1] / "export" / "configs"
REF = Path(os.environ.get("DVIS_TRT_REFERENCE",
                          Path(__file__).resolve().parents[2] / "shared" / "reference"))
if not REF.is_dir():
    REF = Path("/work/shared/reference")
R50_OFFICIAL = REF / "configs" / "dvis_daq" / "ovis" / "DAQ_Offline_R50.yaml"
needs_ref = pytest.mark.skipif(not R50_OFFICIAL.is_file(), reason="shared/reference not present")


def _keys_tsv(name):
    rows = []
    for line in (REF / name).read_text().splitlines():
        key, shape, _ = line.split("\t")
        rows.append((key, tuple(int(x) for x in shape.split(",")) if shape else ()))
    return rows


@pytest.fixture(scope="module")
def r50_meta():
    cfg = load_config(R50_OFFICIAL)
    with torch.device("meta"):
        return build_model(cfg)


@needs_ref
def test_r50_state_dict_equals_official_keys_tsv(r50_meta):
    ours = [(k, tuple(v.shape)) for k, v in r50_meta.state_dict().items()]
    ref = _keys_tsv("dvis_daq_offline_r50_ovis.keys.tsv")
    assert len(ours) == len(ref) == 956
    assert ours == ref  # names, shapes and order
    counts = {}
    for k, v in r50_meta.named_parameters():
        counts[k.split(".")[0] if not k.startswith("sem_seg_head") else
               ".".join(k.split(".")[:2])] = counts.get(k.split(".")[0] if not k.startswith(
                   "sem_seg_head") else ".".join(k.split(".")[:2]), 0) + v.numel()
    # parameter counts of the official model (shared/reference/README.md)
    assert counts["sem_seg_head.pixel_decoder"] == 6_035_904
    assert counts["sem_seg_head.predictor"] == 14_662_682
    assert counts["tracker"] == 18_624_794
    assert counts["refiner"] == 11_259_419


@needs_ref
def test_packaged_r50_config_builds_the_same_model_as_the_official_chain():
    a = load_config(R50_OFFICIAL)
    b = load_config(PKG_CONFIGS / "dvis_daq_offline_r50_ovis.yaml")
    da, db = a.to_dict()["MODEL"], b.to_dict()["MODEL"]
    da.pop("WEIGHTS"), db.pop("WEIGHTS")
    assert da == db
    assert a.INPUT.MIN_SIZE_TEST == b.INPUT.MIN_SIZE_TEST == 480
    assert a.INPUT.MAX_SIZE_TEST == b.INPUT.MAX_SIZE_TEST == 1333


def _tiny_ckpt(tmp_path, overrides=None):
    cfg = load_config(PKG_CONFIGS / "tiny.yaml", overrides)
    model = build_test_model(cfg, seed=3)
    path = tmp_path / "tiny.pth"
    sd = model.state_dict()
    torch.save({"model": sd}, path)
    return cfg, model, path


def test_strict_load_roundtrip_and_wrong_class_count_fails_loudly(tmp_path):
    cfg, model, path = _tiny_ckpt(tmp_path)
    fresh = build_model(cfg)
    load_checkpoint(fresh, path, config_name="tiny.yaml")
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    other = build_model(load_config(PKG_CONFIGS / "tiny.yaml",
                                    ["MODEL.SEM_SEG_HEAD.NUM_CLASSES=40"]))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(other, path, config_name="tiny.yaml (40 classes)")
    msg = str(err.value)
    assert "\n" not in msg
    assert "class_embed" in msg and "tiny.yaml (40 classes)" in msg


def test_unsupported_backbone_is_one_clear_error():
    cfg = load_config(PKG_CONFIGS / "tiny.yaml", ["MODEL.BACKBONE.NAME=D2SwinTransformer"])
    with pytest.raises(InputError, match="D2SwinTransformer"):
        build_model(cfg)


@pytest.fixture(scope="module")
def tiny_run():
    cfg = load_config(PKG_CONFIGS / "tiny.yaml")
    model = build_test_model(cfg, seed=0)
    frames = list(render_scene(12, (120, 200), seed=1)[0])
    return model, frames, model(frames)


def test_eager_clip_outputs_are_well_formed(tiny_run):
    model, frames, out = tiny_run
    s = model.settings
    n = len(out["scores"])
    assert n == s.max_num
    assert out["masks"].shape == (n, len(frames), 120, 200) and out["masks"].dtype == bool
    assert np.all(np.diff(out["scores"]) <= 0)  # sorted, descending
    assert out["labels"].min() >= 0 and out["labels"].max() < s.num_classes
    # the spread test weights make a clip that really tracks: many tracks born, and the final
    # set mixes tracker sequences and frame-linked fill queries
    assert out["num_tracks"] > 5
    assert (out["track_ids"] < 1_000_000).any() and (out["track_ids"] >= 1_000_000).any()


def test_eager_tracker_births_kills_and_filters(tiny_run):
    model, frames, _ = tiny_run
    from dvis_trt.runtime.preprocess import preprocess_frames
    s = model.settings
    images, _ = preprocess_frames(frames, s.min_size_test, s.max_size_test, s.pixel_mean,
                                  s.pixel_std, s.size_divisibility)
    seg = model.run_segmenter(torch.from_numpy(images))
    hub = model.run_tracker(seg)
    starts = {q.start_time for q in hub.values()}
    assert 0 in starts and len(starts) > 1            # births on frame 0 and later
    assert any(q.dead for q in hub.values())           # kick-out after 8 misses
    short = [q for q in hub.values()
             if len(q.embeds) < s.noise_frame_num and q.start_time + len(q.embeds) < len(frames)]
    assert short                                       # noise-filtered sequences exist
    inst, ids = model.select_instances(hub, seg)
    assert inst.shape == (len(frames), s.num_new_ins, seg["frame_embeds"].shape[-1])
    assert len(ids) == s.num_new_ins


def test_eager_is_deterministic_and_window_independent(tiny_run):
    model, frames, out = tiny_run
    model.window = 3
    try:
        again = model(frames)
    finally:
        model.window = 5
    np.testing.assert_array_equal(again["track_ids"], out["track_ids"])
    np.testing.assert_array_equal(again["labels"], out["labels"])
    # windows only batch frames (each frame is independent): float noise only
    np.testing.assert_allclose(again["scores"], out["scores"], rtol=1e-4, atol=1e-5)
    assert (again["masks"] == out["masks"]).mean() > 0.999


@pytest.mark.slow
@needs_ref
def test_r50_eager_runs_a_12_frame_360p_clip():
    cfg = load_config(R50_OFFICIAL)
    model = build_test_model(cfg, seed=0)
    frames = list(render_scene(12, (360, 640), seed=1)[0])
    out = model(frames)
    assert out["masks"].shape == (cfg.MODEL.MASK_FORMER.TEST.MAX_NUM, 12, 360, 640)
