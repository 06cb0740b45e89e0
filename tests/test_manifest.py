"""runtime/manifest.py: stage contracts, symbolic shapes, load/write with validation."""
from __future__ import annotations

import json
import os

import pytest

from dvis_trt.runtime import bundle as M
from dvis_trt.errors import BundleError

# DESIGN.md's stage table written out for the R50 OVIS numbers (Q=100, C=D=256, K=25, N=100,
# S=5) — independent of the STAGE_SPECS template.
R50_TABLE = {
    "segmenter": (
        [("images", "float32", ("T", 3, "Hp", "Wp"))],
        [("mask_features", "float32", ("T", 256, "h", "w")),
         ("frame_embeds", "float32", ("T", 100, 256)),
         ("pred_logits", "float32", ("T", 100, 26)),
         ("mask_pooled", "float32", ("T", 100, 256))]),
    "tracker_first": (
        [("frame_embeds", "float32", (100, 256)), ("mask_features", "float32", (256, "h", "w"))],
        [("embeds", "float32", (100, 256)), ("pred_logits", "float32", (100, 26)),
         ("track_pos", "float32", (100, 256))]),
    "tracker_step": (
        [("track_queries", "float32", ("tQ", 256)), ("track_pos", "float32", ("tQ", 256)),
         ("frame_embeds", "float32", (100, 256)), ("mask_pooled", "float32", (100, 256)),
         ("mask_features", "float32", (256, "h", "w")), ("slot_index", "int64", ("tQ+5",))],
        [("embeds", "float32", ("tQ+100", 256)), ("pred_logits", "float32", ("tQ+100", 26)),
         ("slot_logits", "float32", ("tQ", 26)), ("track_pos_out", "float32", ("tQ+100", 256))]),
    "refiner": (
        [("instance_embeds", "float32", ("L", "Qr", 256)),
         ("frame_embeds", "float32", ("L", 100, 256))],
        [("pred_logits", "float32", ("Qr", 26)), ("mask_embed", "float32", ("L", "Qr", 256))]),
    "mask_head": (
        [("mask_embed", "float32", ("t", "Qs", 256)),
         ("mask_features", "float32", ("t", 256, "h", "w"))],
        [("pred_masks", "float32", ("Qs", "t", "h", "w"))]),
    # online mode (optional in a bundle): the tracker's own masks of the stored tracks
    "tracker_masks": (
        [("embeds", "float32", ("tM", 256)), ("mask_features", "float32", (256, "h", "w"))],
        [("pred_masks", "float32", ("tM", "h", "w"))]),
}

CONFIG = {"source": "configs/x.yaml", "num_classes": 25, "num_queries": 100, "hidden_dim": 256,
          "mask_dim": 256, "num_new_ins": 100, "num_slots": 5,
          "pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375],
          "min_size_test": 480, "max_size_test": 1333, "size_divisibility": 32,
          "inference_select_threshold": 0.1, "aux_inference_select_threshold": 0.01,
          "dis_fg_threshold": 0.01, "ovis_infer": True, "noise_frame_num": 2,
          "offline_topk_num": 20, "max_num": 20, "refiner_window_size": 3,
          "class_names": None}


def _as_table(specs):
    return {s: ([(t.name, t.dtype, t.shape) for t in i], [(t.name, t.dtype, t.shape) for t in o])
            for s, (i, o) in specs.items()}


def test_stage_specs_match_design_table():
    assert _as_table(M.stage_specs(100, 256, 25, 100, 5)) == R50_TABLE
    assert tuple(M.STAGE_SPECS) == M.EXPORT_STAGE_NAMES


def test_stage_specs_mask_dim_and_bad_values():
    specs = M.stage_specs(Q=7, C=16, K=3, N=9, S=2, D=8)
    seg_out = {t.name: t.shape for t in specs["segmenter"][1]}
    assert seg_out["mask_features"] == ("T", 8, "h", "w")
    assert seg_out["frame_embeds"] == ("T", 7, 16)
    assert seg_out["pred_logits"] == ("T", 7, 4)
    step_in = {t.name: t.shape for t in specs["tracker_step"][0]}
    assert step_in["slot_index"] == ("tQ+2",)
    with pytest.raises(ValueError):
        M.stage_specs(0, 256, 25, 100, 5)


def test_eval_and_resolve():
    assert M.eval_dim("tQ+5", {"tQ": 3}) == 8
    assert M.eval_dim("Hp/4", {"Hp": 480}) == 120
    assert M.eval_dim("2*L-1", {"L": 4}) == 7
    assert M.eval_dim(7, {}) == 7
    with pytest.raises(KeyError):
        M.eval_dim("tQ+5", {})
    with pytest.raises(ValueError, match="not divisible"):
        M.eval_dim("Hp/4", {"Hp": 482})
    with pytest.raises(ValueError):
        M.eval_dim("__import__('os')", {})
    assert M.resolve_shape(["T", 256, "h", "w"], {"T": 5, "Hp": 480, "Wp": 864}) == \
        (5, 256, 120, 216)
    with pytest.raises(ValueError, match="'L'"):
        M.resolve_shape(["L", 3], {"T": 1})
    assert M.simplify_dim("tQ+S", {"S": 5}) == "tQ+5"
    assert M.simplify_dim("K+1", {"K": 25}) == 26
    assert M.shape_symbols(["tQ+5", 256, "h"]) == {"tQ", "h"}


def test_output_shapes_from_inputs():
    specs = M.stage_specs(100, 256, 25, 100, 5)
    ins, outs = specs["tracker_step"]
    stage = M.StageSpec("tracker_step", "x.onnx", "0" * 64, ins, outs)
    shapes = {"track_queries": (3, 256), "track_pos": (3, 256), "frame_embeds": (100, 256),
              "mask_pooled": (100, 256), "mask_features": (256, 120, 216), "slot_index": (8,)}
    assert stage.output_shapes(shapes) == {"embeds": (103, 256), "pred_logits": (103, 26),
                                           "slot_logits": (3, 26), "track_pos_out": (103, 256)}
    with pytest.raises(ValueError, match="slot_index"):
        stage.output_shapes({**shapes, "slot_index": (7,)})
    with pytest.raises(ValueError, match="tQ"):
        stage.output_shapes({**shapes, "track_pos": (4, 256)})


def _write_bundle(tmp_path, config=CONFIG, stages=None, constants=True):
    specs = M.stage_specs(config["num_queries"], config["hidden_dim"], config["num_classes"],
                          config["num_new_ins"], config["num_slots"], config["mask_dim"])
    stages_d = {}
    for name in stages or M.STAGE_NAMES:
        (tmp_path / f"{name}.onnx").write_bytes(f"fake onnx {name}".encode())
        ins, outs = specs[name]
        stages_d[name] = {"file": f"{name}.onnx", "sha256": "0" * 64,
                          "inputs": [t.to_dict() for t in ins],
                          "outputs": [t.to_dict() for t in outs]}
    d = {"format_version": 1, "producer": {"dvis_trt": "0.1.0"}, "config": config,
         "msda": "plugin", "precision": "fp16", "stages": stages_d}
    if constants:
        (tmp_path / "constants.npz").write_bytes(b"npz bytes")
        d["constants"] = {"file": "constants.npz", "sha256": "0" * 64,
                          "arrays": {"bg_slots": [5, 256]}}
    m = M.manifest_from_dict(d)
    return M.write_manifest(tmp_path, m)


def test_write_then_load_roundtrip(tmp_path):
    written = _write_bundle(tmp_path)
    loaded = M.load_manifest(tmp_path)
    assert loaded == written
    assert loaded.root == tmp_path.resolve()
    assert loaded.stage_path("refiner") == tmp_path.resolve() / "refiner.onnx"
    # the hashes were computed from the files, not copied from the input
    import hashlib
    assert loaded.stages["segmenter"].sha256 == \
        hashlib.sha256(b"fake onnx segmenter").hexdigest()
    assert loaded.constants.arrays == {"bg_slots": (5, 256)}
    assert loaded.config.pixel_mean == (123.675, 116.28, 103.53)
    assert loaded.dims == {"Q": 100, "C": 256, "D": 256, "K": 25, "N": 100, "S": 5}
    # no temp files left
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_unknown_config_keys_survive(tmp_path):
    cfg = dict(CONFIG, future_knob=3)
    _write_bundle(tmp_path, config=cfg)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["config"]["future_knob"] == 3
    assert M.load_manifest(tmp_path).config.extra == {"future_knob": 3}


def _edit(tmp_path, fn):
    p = tmp_path / "manifest.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format_version=2), "upgrade dvis-trt"),
    (lambda d: d.update(format_version=0), "re-export"),
    (lambda d: d.update(msda="cuda"), "msda"),
    (lambda d: d.update(precision="int4"), "precision"),
    (lambda d: d["config"].pop("num_slots"), "num_slots"),
    (lambda d: d["config"].update(ovis_infer="yes"), "ovis_infer"),
    (lambda d: d["config"].update(pixel_std=[1.0, 2.0]), "pixel_std"),
    (lambda d: d["stages"]["refiner"].update(file="../refiner.onnx"), "outside the bundle"),
    (lambda d: d["stages"]["refiner"].update(sha256="abc"), "sha256"),
    (lambda d: d["stages"].pop("mask_head"), "mask_head"),
    (lambda d: d["stages"]["tracker_step"]["outputs"][3].update(name="track_pos"),
     "track_pos_out"),
    (lambda d: d["stages"]["segmenter"]["outputs"][2].update(shape=["T", 100, 30]),
     "config says 26"),
    (lambda d: d["stages"]["segmenter"]["inputs"][0].update(shape=["T", 3, "Hp"]), "rank"),
    (lambda d: d["stages"]["segmenter"]["inputs"][0].update(dtype="float128"), "dtype"),
])
def test_load_rejects(tmp_path, edit, match):
    _write_bundle(tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(BundleError, match=match):
        M.load_manifest(tmp_path)


def test_load_missing_and_corrupt_files(tmp_path):
    with pytest.raises(BundleError, match="not a dvis-trt bundle"):
        M.load_manifest(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        M.load_manifest(tmp_path / "nope")
    _write_bundle(tmp_path)
    (tmp_path / "tracker_step.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError) as err:
        M.load_manifest(tmp_path)
    msg = str(err.value)
    assert "tracker_step.onnx" in msg and "sha256" in msg and "re-export" in msg
    assert "\n" not in msg
    M.load_manifest(tmp_path, verify=False)  # structure is fine
    (tmp_path / "tracker_step.onnx").write_bytes(b"fake onnx tracker_step")
    M.load_manifest(tmp_path)  # restored -> fine again
    os.remove(tmp_path / "constants.npz")
    with pytest.raises(BundleError, match="constants.npz"):
        M.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        M.load_manifest(tmp_path)


def test_partial_bundle_allowed_when_asked(tmp_path):
    _write_bundle(tmp_path, stages=["segmenter"], constants=False)
    with pytest.raises(BundleError, match="tracker_first"):
        M.load_manifest(tmp_path)
    assert list(M.load_manifest(tmp_path, require_stages=()).stages) == ["segmenter"]


def test_write_is_atomic(tmp_path, monkeypatch):
    first = _write_bundle(tmp_path)
    before = (tmp_path / "manifest.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    changed = M.manifest_from_dict(dict(first.to_dict(), precision="fp32"))
    with pytest.raises(OSError):
        M.write_manifest(tmp_path, changed)
    assert (tmp_path / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_refuses_missing_stage_file(tmp_path):
    m = _write_bundle(tmp_path)
    os.remove(tmp_path / "refiner.onnx")
    with pytest.raises(BundleError, match="refiner.onnx"):
        M.write_manifest(tmp_path, m)
