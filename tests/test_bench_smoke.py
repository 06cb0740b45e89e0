"""The bench harness: statistics, A/B order, FLOP counting, parity, and one smoke run of
``dvis-trt bench`` on the reduced (tiny) config that checks the three output files' schema.

No timing assertions anywhere: only structure, counts and values that do not depend on speed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from dvis_trt.benchmarks import harness  # noqa: E402
from dvis_trt.benchmarks.flops import count_graph_flops  # noqa: E402
from dvis_trt.export.config import load_config  # noqa: E402

PKG_CONFIGS = Path(__file__).resolve().parents[1] / "export" / "configs"
TINY = PKG_CONFIGS / "tiny.yaml"


# ---------------------------------------------------------------------------------------------
# statistics and A/B order
# ---------------------------------------------------------------------------------------------
def test_summarize_matches_hand_computed_percentiles():
    samples = list(range(100, 0, -1))  # 1..100, unsorted
    st = harness.summarize(samples)
    # linear interpolation between order statistics: position (n-1)*q
    assert st["n"] == 100 and st["min"] == 1 and st["max"] == 100
    assert st["p50"] == pytest.approx(50.5)
    assert st["p90"] == pytest.approx(90.1)
    assert st["p99"] == pytest.approx(99.01)
    assert st["mean"] == pytest.approx(50.5)
    with pytest.raises(ValueError):
        harness.summarize([])


def test_alternate_reverses_the_order_every_round():
    calls = []
    runs = {n: (lambda n=n: calls.append(n) or 1.0) for n in ("A", "B", "C")}
    out = harness.alternate(runs, rounds=3, warmup=1, settle_s=0)
    assert calls == ["A", "B", "C"] + ["A", "B", "C", "C", "B", "A", "A", "B", "C"]
    assert out == {"A": [1.0] * 3, "B": [1.0] * 3, "C": [1.0] * 3}
    r = harness.ratio_summary([2.0, 1.0, 3.0])
    assert (r["min"], r["median"], r["max"]) == (1.0, 2.0, 3.0)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def _toy_graph():
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "m", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3],
                           rng.standard_normal(108).astype(np.float32).tolist())
    k = helper.make_tensor("k", TensorProto.FLOAT, [8, 5],
                           rng.standard_normal(40).astype(np.float32).tolist())
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["y"]),
             helper.make_node("MatMul", ["q", "k"], ["z"])]
    g = helper.make_graph(nodes, "toy", [x, q], [y, z], [w, k])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_flops_of_a_toy_graph_follow_the_textbook_formulas():
    f = count_graph_flops(_toy_graph(), {"x": (2, 3, 16, 20), "q": (3, 7, 8)})
    # conv: out (2, 4, 8, 10), each output = 3*3*3 MACs; matmul: (3,7,8)x(8,5) = 3*7*5*8 MACs
    conv = 2 * (2 * 4 * 8 * 10) * 27
    mm = 2 * 3 * 7 * 5 * 8
    assert f.by_op["Conv"] == conv and f.by_op["MatMul"] == mm
    assert f.gemm == conv + mm
    assert f.by_op["Relu"] == 2 * 4 * 8 * 10  # 1 per output element
    assert f.unresolved == []


@pytest.fixture(scope="module")
def tiny_model():
    from dvis_trt.export.testing import build_test_model
    return build_test_model(load_config(TINY), seed=0)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_model):
    from dvis_trt.export.onnx_export import export_bundle
    from dvis_trt.runtime.synthetic import make_demo_video
    root = tmp_path_factory.mktemp("bench")
    bundle = root / "bundle"
    export_bundle(tiny_model, load_config(TINY), bundle, msda="onnx", window=3,
                  example_size=(96, 160))
    video = root / "clip.mp4"
    make_demo_video(video, num_frames=6, size=(96, 150), seed=1)
    return bundle, video


def test_segmenter_flops_from_onnx_agree_with_torch_flop_counter(tiny_model, tiny_bundle):
    """Independent check: torch's FlopCounterMode on the eager segmenter module vs our count
    from the exported graph. Both count matmul/conv multiply-adds as 2 FLOPs; they differ only
    where eager and exported attention take different (equivalent) op sequences, < 2%."""
    from torch.utils.flop_counter import FlopCounterMode
    from dvis_trt.export.stages import build_stages
    bundle, _ = tiny_bundle
    seg = build_stages(tiny_model)["segmenter"]
    with FlopCounterMode(display=False) as fc:
        seg(torch.randn(3, 3, 96, 160))
    ours = count_graph_flops(bundle / "segmenter.onnx", {"images": (3, 3, 96, 160)})
    assert ours.unresolved == []
    assert ours.gemm == pytest.approx(fc.get_total_flops(), rel=0.02)


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------
def _instances(seed=0, s=4, t=3, h=20, w=24):
    rng = np.random.default_rng(seed)
    masks = np.zeros((s, t, h, w), bool)
    for i in range(s):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        masks[i, :, y:y + 8, x:x + 8] = True
    return harness.Instances(scores=np.linspace(0.9, 0.3, s).astype(np.float32),
                             labels=np.arange(s, dtype=np.int64) % 3,
                             track_ids=np.arange(s, dtype=np.int64), masks=masks)


def test_parity_accepts_a_permuted_copy_and_rejects_real_differences():
    ref = _instances()
    perm = np.array([2, 0, 3, 1])
    got = harness.Instances(ref.scores[perm], ref.labels[perm], ref.track_ids[perm] + 100,
                            ref.masks[perm].copy())
    res = harness.compare_instances(ref, got)
    assert res["ok"] and res["min_iou"] == 1.0 and not res["track_ids_equal"]

    # a few boundary pixels: still the same instance; IoU computed directly for that pair
    got.masks[0, 0, :, :] ^= np.eye(got.masks.shape[2], got.masks.shape[3], dtype=bool)
    res = harness.compare_instances(ref, got)
    a, b = ref.masks[perm[0]], got.masks[0]
    assert res["ok"] and res["min_iou"] == pytest.approx((a & b).sum() / (a | b).sum())

    fewer = harness.Instances(ref.scores[:3], ref.labels[:3], ref.track_ids[:3], ref.masks[:3])
    assert not harness.compare_instances(ref, fewer)["ok"]
    relabel = harness.Instances(ref.scores, (ref.labels + 1) % 3, ref.track_ids, ref.masks)
    assert not harness.compare_instances(ref, relabel)["ok"]
    shifted = harness.Instances(ref.scores + 0.01, ref.labels, ref.track_ids, ref.masks)
    out = harness.compare_instances(ref, shifted, score_atol=1e-3)
    assert not out["ok"] and "score" in out["reason"]


# ---------------------------------------------------------------------------------------------
# the eager runner is DvisDaqOffline.forward, timed
# ---------------------------------------------------------------------------------------------
def test_eager_runner_equals_the_models_forward(tiny_model):
    from dvis_trt.runtime.synthetic import render_scene
    frames = list(render_scene(7, (96, 150), seed=2)[0])
    want = tiny_model(frames)
    got = harness.EagerRunner(tiny_model, window=5).run(frames)
    np.testing.assert_array_equal(got.instances.masks, want["masks"])
    np.testing.assert_array_equal(got.instances.labels, want["labels"])
    np.testing.assert_array_equal(got.instances.track_ids, want["track_ids"])
    np.testing.assert_array_equal(got.instances.scores, want["scores"])
    assert set(got.groups) == set(harness.STAGE_GROUPS)
    assert set(got.stage_calls) == set(harness.ENGINE_STAGES)  # every stage module was clocked
    # no clock is left behind on the model
    assert "forward_step" not in vars(tiny_model.tracker)
    assert "forward" not in vars(tiny_model.segmenter())


# ---------------------------------------------------------------------------------------------
# smoke: the CLI end to end, output schema
# ---------------------------------------------------------------------------------------------
def _bench(bundle, video, out, *extra):
    from dvis_trt.runtime.cli import main
    return main(["bench", "--bundle", str(bundle), "--video", str(video), "--test-weights", "0",
                 "--backends", "torch,ort", "--warmup", "1", "--repeats", "1",
                 "--stage-iters", "1", "--gemm-seconds", "0.05", "--gemm-sizes", "128",
                 "--out", str(out), "--quiet", *extra])


def test_bench_cli_writes_json_markdown_png_with_the_schema(tiny_bundle, tmp_path, capsys):
    import torch
    bundle, video = tiny_bundle
    out = tmp_path / "out"
    assert torch.is_grad_enabled()
    assert _bench(bundle, video, out, "--profile-ops") == 0
    # the eager baseline runs under no_grad locally; the process's autograd state is untouched
    # (a global switch made later tests depend on whether a bench ran before them)
    assert torch.is_grad_enabled()
    hist = json.loads((out / "bench.json").read_text())
    assert hist["schema"] == "dvis-trt-bench/1" and len(hist["runs"]) == 1
    rec = hist["runs"][0]
    for key in ("id", "started", "machine", "threads", "settings", "e2e", "ratios", "stages",
                "gemm", "flops"):
        assert key in rec, key
    assert rec["threads"]["threads"] >= 1 and rec["machine"]["versions"]["torch"]
    assert rec["settings"]["frames"] == 6 and rec["settings"]["video_size"] == [96, 150]
    stat_keys = {"n", "mean", "std", "min", "p50", "p90", "p99", "max"}
    for backend in ("torch", "ort"):
        row = rec["e2e"][backend]
        assert row["valid"] is True and row["parity"]["ok"] is True
        assert stat_keys <= set(row["wall_s"]) and row["wall_s"]["n"] == 1
        assert row["fps"] > 0 and row["fps_with_decode"] > 0
        assert set(row["groups_s"]) == set(harness.STAGE_GROUPS)
        assert row["memory"]["peak_rss_mb"] > 0
    assert rec["e2e"]["ort"]["parity"]["instances"] == rec["e2e"]["ort"]["parity"]["ref_instances"]
    r = rec["ratios"]["ort vs torch"]
    assert r["min"] <= r["median"] <= r["max"] and r["n"] == 1
    assert set(rec["stages"]) == set(harness.ENGINE_STAGES)
    for stage, res in rec["stages"].items():
        for backend in ("torch", "ort"):
            assert stat_keys <= set(res[backend]) and res[backend]["n"] == 1
        assert res["_flops"]["gemm_gflops"] > 0
    assert rec["gemm"]["best"]["gflops"] > 0
    prof = rec["op_profile"]
    assert prof["stage"] == "segmenter" and set(prof["backends"]) == {"torch", "ort"}
    for p in prof["backends"].values():
        assert p["ops"] and sum(o["share"] for o in p["ops"]) <= 1 + 1e-9
    assert "Conv" in {o["op"] for o in prof["backends"]["ort"]["ops"]}
    fl = rec["flops"]["stages"]
    assert set(fl) == set(harness.ENGINE_STAGES)
    assert fl["segmenter"]["calls"] == 2  # 6 frames in windows of 5
    assert fl["tracker_step"]["calls"] == 5 and fl["tracker_first"]["calls"] == 1
    assert all(v["unresolved_nodes"] == [] for v in fl.values())

    md = (out / "bench.md").read_text()
    assert "## End to end" in md and "| ort | OK" in md and "## FLOPs per frame" in md
    assert "## segmenter by op type" in md
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt
    assert plt.imread(out / "bench.png").ndim == 3

    # a second run appends to the history and --compare prints deltas
    capsys.readouterr()
    assert _bench(bundle, video, out, "--no-stages", "--no-flops",
                  "--compare", str(out / "bench.json")) == 0
    text = capsys.readouterr().out
    assert "compare " in text and "ort: wall p50" in text
    hist = json.loads((out / "bench.json").read_text())
    assert len(hist["runs"]) == 2 and hist["runs"][1]["stages"] == {}


def test_bench_rejects_unknown_backend_and_foreign_compare_file(tiny_bundle, tmp_path, capsys):
    bundle, video = tiny_bundle
    from dvis_trt.runtime.cli import main
    rc = main(["bench", "--bundle", str(bundle), "--video", str(video), "--test-weights", "0",
               "--backends", "torch,onnxrt", "--out", str(tmp_path)])
    assert rc == 2 and "unknown backend" in capsys.readouterr().err
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    rc = main(["bench", "--bundle", str(bundle), "--video", str(video), "--test-weights", "0",
               "--compare", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "schema" in err and len(err.strip().splitlines()) == 1


def test_bench_refuses_two_bundles_whose_rows_would_share_a_key(tiny_bundle, tmp_path, capsys):
    """Rows are keyed by (backend, msda, precision) and, where two bundles share those, by the
    bundle's folder name: two such bundles in folders of the same name are refused (a second
    row used to replace the first one's silently)."""
    import shutil
    bundle, video = tiny_bundle
    twin = tmp_path / "elsewhere" / bundle.name
    shutil.copytree(bundle, twin)
    from dvis_trt.runtime.cli import main
    rc = main(["bench", "--bundle", str(bundle), "--bundle", str(twin), "--video", str(video),
               "--test-weights", "0", "--backends", "ort", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "separate runs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "bench.json").exists()


def test_bench_row_keys_tell_same_precision_bundles_apart_by_folder_name():
    """Two int8 variants of one fp32 bundle get their own rows; the fp32 twin keeps the plain
    key that the int8 rows' parity and ratios look up."""
    from types import SimpleNamespace as NS

    from dvis_trt.benchmarks.bench_options import _row_key, bundle_tags
    mans = [NS(root="/b/r50_plugin", msda="plugin", precision="fp32"),
            NS(root="/b/r50_int8", msda="plugin", precision="int8"),
            NS(root="/c/r50_int8_xpd", msda="plugin", precision="int8"),
            NS(root="/b/r50_onnx", msda="onnx", precision="fp32")]
    tags = bundle_tags(mans)
    assert tags == {"/b/r50_plugin": "", "/b/r50_int8": "r50_int8",
                    "/c/r50_int8_xpd": "r50_int8_xpd", "/b/r50_onnx": ""}
    keys = [_row_key("ort", m.msda, True, m.precision, tags[m.root]) for m in mans]
    assert keys == ["ort[msda=plugin]", "ort[msda=plugin,int8,r50_int8]",
                    "ort[msda=plugin,int8,r50_int8_xpd]", "ort[msda=onnx]"]
    assert _row_key("ort", "plugin", True) == keys[0]          # the int8 rows' fp32 twin
    assert _row_key("ort", "plugin", False, "int8", "x") == "ort"   # one bundle: plain name
