"""INT8: Q/DQ quantization of a bundle (tiny config), its accuracy report, `check --against`.

The accuracy-report figures are checked on planted masks with hand-computed values; the
quantized bundle is checked for TensorRT's explicit-quantization rules (int8, zero point 0,
per-channel weight scales) and run end to end in ONNX Runtime; a deliberately broken
quantization (the class head quantized with a corrupted weight scale) must fail
`check --against`.
"""
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from dvis_trt.runtime.accuracy import AccuracyReport, InstanceSet, compare_instances  # noqa: E402


# ------------------------------------------------------------------ the report's arithmetic
def _box(t, h, w, y0, y1, x0, x1, frames=None):
    m = np.zeros((t, h, w), bool)
    for f in (range(t) if frames is None else frames):
        m[f, y0:y1, x0:x1] = True
    return m


def test_report_figures_on_planted_masks():
    t, h, w = 4, 20, 20
    a = _box(t, h, w, 0, 10, 0, 10)             # 100 px per frame
    b = _box(t, h, w, 10, 20, 10, 20)
    c = _box(t, h, w, 0, 5, 15, 20)             # 25 px
    ref = InstanceSet(np.stack([a, b, c]), np.array([1, 2, 3]), np.array([0.9, 0.8, 0.7]), 5)
    a2 = a.copy()
    a2[3] = False
    a2[3, 0:10, 0:5] = True                    # frame 3: half of a -> IoU 0.5 there
    b2 = b.copy()                               # same mask, other label
    far = _box(t, h, w, 15, 20, 0, 5)           # c is gone, an unrelated instance appears
    cand = InstanceSet(np.stack([b2, far, a2]), np.array([5, 3, 1]),
                       np.array([0.75, 0.5, 0.95]), 6)
    rep = compare_instances(ref, cand)
    assert (rep.reference_instances, rep.candidate_instances) == (3, 3)
    assert rep.matched == 2                     # a<->a2, b<->b2; c has no partner (IoU 0)
    assert rep.matched_fraction == pytest.approx(2 / 3)
    assert rep.label_agreement == pytest.approx(0.5)
    # per-frame IoU: a pair 1, 1, 1, 0.5; b pair 1 x 4
    assert rep.mean_iou == pytest.approx(7.5 / 8)
    assert rep.worst_iou == pytest.approx(0.5)
    assert sorted(rep.video_ious) == pytest.approx([350 / 400, 1.0])
    assert sorted(rep.score_deltas) == pytest.approx([0.05, 0.05])
    assert (rep.reference_tracks, rep.candidate_tracks, rep.span_differs) == (5, 6, 0)
    assert not rep.passed and rep.verdict().startswith("FAIL: 2/3 instances matched (66.7 %")
    # the same set against itself passes with perfect figures
    same = compare_instances(ref, ref)
    assert same.passed and same.mean_iou == 1.0 and same.matched_fraction == 1.0
    # a track that ends one frame early is a span difference
    a3 = a.copy()
    a3[3] = False
    short = compare_instances(ref, InstanceSet(np.stack([a3, b, c]), ref.labels, ref.scores, 5))
    assert short.span_differs == 1 and short.matched == 3
    d = short.to_dict()
    assert d["tracks"]["matched_spans_differ"] == 1 and d["passed"] is True


def test_report_accumulates_over_videos_and_handles_empty_sets():
    t, h, w = 2, 8, 8
    a = _box(t, h, w, 0, 4, 0, 4)
    ref = InstanceSet(a[None], np.array([0]), np.array([0.5]), 1)
    empty = InstanceSet(np.zeros((0, t, h, w), bool), np.zeros(0, int), np.zeros(0), 0)
    rep = AccuracyReport()
    compare_instances(ref, ref, rep)
    compare_instances(ref, empty, rep)
    assert rep.reference_instances == 2 and rep.matched == 1 and rep.matched_fraction == 0.5
    assert compare_instances(empty, empty).passed


# ------------------------------------------------------------------ quantization
def _qdq_nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, demo_mp4, tmp_path_factory):
    """The tiny fp32 bundle quantized on 6 frames of the demo video, with its report."""
    from dvis_trt.export.quantize import quantize_bundle

    out = tmp_path_factory.mktemp("int8") / "tiny_int8"
    manifest, report = quantize_bundle(tiny_bundle, out, [demo_mp4.path], num_frames=6,
                                       threads=2)
    return manifest, report


def test_select_nodes_keeps_sensitive_parts_fp32(tiny_bundle):
    from dvis_trt.export.precision import ensure_node_names
    from dvis_trt.export.quantize import select_nodes

    model = onnx.load(str(tiny_bundle / "segmenter.onnx"))
    ensure_node_names(model)
    quant, kept = select_nodes(model)
    assert any("/backbone/res2/" in n for n in quant)                  # backbone convs
    assert any("transformer/encoder" in n and "value_proj" in n for n in quant)
    assert any("transformer_ffn_layers" in n for n in quant)           # decoder FFN
    for name in quant:
        assert not any(k in name for k in ("class_embed", "mask_embed", "sampling_offsets",
                                            "attention_weights", "mask_features/"))
    reasons = set(kept.values())
    assert {"class-head", "mask-embedding", "msda-coordinates", "mask-features"} <= reasons
    # activation x activation products (attention logits, mask products) are not candidates
    consts = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.name in quant:
            assert n.input[1] in consts


def test_int8_bundle_is_explicit_qdq_and_runs_in_ort(int8_bundle, tiny_bundle, demo_frames):
    from dvis_trt.runtime.accuracy import REPORT_FILE
    from dvis_trt.runtime.runner import Runner

    manifest, report = int8_bundle
    assert manifest.precision == "int8"
    cal = manifest.producer["calibration"]
    assert cal["num_samples"] == 6 and cal["videos"][0]["indices"][0] == 0
    assert cal["videos"][0]["indices"][-1] == cal["videos"][0]["frames"] - 1   # whole video
    assert manifest.producer["quantization"]["stages"]["segmenter"]["quantized"] > 50
    model = onnx.load(str(manifest.stage_path("segmenter")))
    qs, dqs = _qdq_nodes(model, "QuantizeLinear"), _qdq_nodes(model, "DequantizeLinear")
    assert qs and dqs
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    # TensorRT explicit quantization: int8, zero point 0 everywhere, per-channel weights
    for n in qs + dqs:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    per_channel = [n for n in dqs if n.input[0] in inits and inits[n.input[1]].ndim == 1]
    assert per_channel
    # graph I/O unchanged; other stages byte-identical copies of the fp32 ones
    assert [i.name for i in model.graph.input] == ["images"]
    assert (manifest.root / "refiner.onnx").read_bytes() == \
        (tiny_bundle / "refiner.onnx").read_bytes()
    # the accuracy report was written with the bundle
    saved = json.loads((manifest.root / REPORT_FILE).read_text())
    assert saved["verdict"] == report.verdict() and saved["reference_instances"] > 0
    assert saved["stages"]["segmenter"]["pred_logits"]["max_rel"] > 0
    assert saved["stages"]["refiner"]["pred_logits"]["max_rel"] == 0   # fp32 stage, same input
    # end to end in ONNX Runtime
    with Runner(manifest.root, "ort", threads=2, quiet=True) as runner:
        res = runner.pipeline.run_video(demo_frames)
    assert res.num_frames == len(demo_frames) and len(res.scores) > 0
    # close to fp32: most instances found again. Mean mask IoU depends on the CPU's int8
    # kernels: 0.68 measured with ORT 1.32 on an AVX2 machine without VNNI (its u8 x s8 pair
    # sums saturate in int16 with full-range weights), above 0.7 with AVX-512 VNNI; the
    # --reduce-range run below gets 0.89 on AVX2
    assert report.matched_fraction >= 0.8 and report.mean_iou >= 0.6


def test_check_against_fails_on_a_broken_quantization(int8_bundle, tiny_bundle, demo_mp4,
                                                      tmp_path, capsys):
    from dvis_trt.export.quantize import corrupt_scale, quantize_bundle
    from dvis_trt.runtime.cli import main

    good = int8_bundle[1]
    broken = tmp_path / "broken"
    quantize_bundle(tiny_bundle, broken, [demo_mp4.path], num_frames=6, report=False,
                    force=("class_embed",))
    assert corrupt_scale(broken / "segmenter.onnx", "class_embed", factor=8.0) == 1
    # re-hash the edited stage (a hand-edited bundle fails the manifest's sha256 check)
    from dvis_trt.runtime.bundle import load_manifest, write_manifest
    write_manifest(broken, load_manifest(broken, verify=False), hash_files=True)
    rc = main(["check", str(broken), "--against", str(tiny_bundle), str(demo_mp4.path),
               "--threads", "2", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL:" in out
    bad = json.loads((tmp_path / "r.json").read_text())
    assert bad["passed"] is False
    assert bad["label_agreement"] < good.label_agreement - 0.2 or \
        bad["matched_fraction"] < good.matched_fraction - 0.2
    # segmenter logits are far off; the other stages are untouched
    assert bad["stages"]["segmenter"]["pred_logits"]["max_rel"] > \
        10 * good.stages["segmenter"]["pred_logits"]["max_rel"]


def test_check_against_needs_videos(tiny_bundle, capsys):
    from dvis_trt.runtime.cli import main

    rc = main(["check", str(tiny_bundle), "--against", str(tiny_bundle)])
    assert rc != 0 and "needs one or more videos" in capsys.readouterr().err


def test_quantize_refuses_bad_inputs(tiny_bundle, int8_bundle, demo_mp4, tmp_path, capsys):
    from dvis_trt.runtime.cli import main

    # not fp32
    assert main(["quantize", str(int8_bundle[0].root), "--calibration", str(demo_mp4.path),
                 "--output", str(tmp_path / "x")]) != 0
    assert "quantize the fp32 bundle" in capsys.readouterr().err
    # output inside the source
    assert main(["quantize", str(tiny_bundle), "--calibration", str(demo_mp4.path),
                 "--output", str(tiny_bundle / "int8")]) != 0
    assert "is inside bundle" in capsys.readouterr().err
    # a foreign non-empty folder is never replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["quantize", str(tiny_bundle), "--calibration", str(demo_mp4.path),
                 "--output", str(foreign)]) != 0
    assert (foreign / "notes.txt").read_text() == "keep me"
    # missing calibration video
    assert main(["quantize", str(tiny_bundle), "--calibration", str(tmp_path / "nope.mp4"),
                 "--output", str(tmp_path / "y")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_quantize_exits_1_when_the_verdict_fails_and_still_writes_the_bundle(
        tiny_bundle, tmp_path, capsys, monkeypatch):
    """The gate: a failing verdict is exit 1 with one line on stderr; the bundle and its
    report are written all the same. Thresholds no report can meet force the FAIL."""
    from dvis_trt.runtime import accuracy
    from dvis_trt.runtime.bundle import load_manifest
    from dvis_trt.runtime.cli import main
    from dvis_trt.runtime.synthetic import make_demo_video

    clip = make_demo_video(tmp_path / "short.mp4", num_frames=5, size=(96, 160), seed=2).path
    monkeypatch.setitem(accuracy.THRESHOLDS, "mean_iou", 1.5)     # IoU <= 1: always FAIL
    out = tmp_path / "int8"
    rc = main(["quantize", str(tiny_bundle), "--calibration", str(clip), "--calibration-frames",
               "2", "--output", str(out), "--threads", "2", "--reduce-range"])
    cap = capsys.readouterr()
    assert rc == 1
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "verdict FAIL" in err[0] and "still written" in err[0]
    assert str(out) in err[0]
    assert "FAIL:" in cap.out                                      # the verdict line itself
    assert load_manifest(out).precision == "int8"                  # written, hashes verified
    saved = json.loads((out / accuracy.REPORT_FILE).read_text())
    assert saved["passed"] is False and saved["thresholds"]["mean_iou"] == 1.5
    assert saved["candidate"]["bundle"] == str(out.absolute())
    # --reduce-range: 7-bit weights, still symmetric int8 (zero point 0) for TensorRT
    man = load_manifest(out)
    assert man.producer["quantization"]["reduce_range"] is True
    model = onnx.load(str(man.stage_path("segmenter")))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [inits[n.input[0]] for n in _qdq_nodes(model, "DequantizeLinear")
               if n.input[0] in inits and inits[n.input[0]].dtype == np.int8]
    assert len(weights) > 50
    lo = min(int(w.min()) for w in weights)
    hi = max(int(w.max()) for w in weights)
    assert -64 <= lo and hi <= 64 and hi - lo >= 100      # 7-bit range (ORT: [-64, 64])
    assert all(not inits[n.input[2]].any() for n in _qdq_nodes(model, "DequantizeLinear"))


def test_verdict_gate_exit_status():
    from dvis_trt.export.cli_quantize import GATE_HELP, verdict_gate

    empty = AccuracyReport()                       # nothing to match on either side: passes
    assert empty.passed and verdict_gate(empty, "b", "quantize") == 0
    assert verdict_gate(None, "b", "quantize") == 0           # --no-report: no verdict, no gate
    failing = AccuracyReport(reference_instances=4, candidate_instances=4, matched=1)
    assert not failing.passed and verdict_gate(failing, "b", "export") == 1
    assert "exit status: 1" in GATE_HELP and "still written" in GATE_HELP


def test_export_int8_returns_the_verdict_gate(tmp_path, monkeypatch, capsys):
    """``export --precision int8`` hands the report of its quantization to the gate (the
    export and quantization themselves are stubbed: the wiring is under test)."""
    from types import SimpleNamespace as NS

    from dvis_trt.export import onnx_export, quantize
    from dvis_trt.runtime.cli import main

    seen = {}

    def fake_export(config, checkpoint, out, **kw):
        Path(out).mkdir(parents=True)

    def fake_quantize(src, out, calibration, **kw):
        seen.update(kw)
        Path(out).mkdir(parents=True)
        return NS(root=Path(out), stages={}), seen["report_obj"]

    monkeypatch.setattr(onnx_export, "export_from_checkpoint", fake_export)
    monkeypatch.setattr(quantize, "quantize_bundle", fake_quantize)
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"x")
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    args = ["export", str(ckpt), "--config", "tiny", "--precision", "int8",
            "--calibration", str(video)]
    for report, rc in ((AccuracyReport(reference_instances=3, candidate_instances=3), 1),
                       (AccuracyReport(), 0), (None, 0)):
        seen["report_obj"] = report
        out = tmp_path / f"b{rc}{report is None}"
        assert main(args + ["-o", str(out)]) == rc
        err = capsys.readouterr().err
        assert ("dvis-trt export: accuracy verdict FAIL" in err) == (rc == 1)


def test_synthetic_scene_motions():
    from dvis_trt.runtime.synthetic import render_scene

    t, size = 9, (90, 160)
    mixed, _, _ = render_scene(t, size, seed=3)
    again, _, _ = render_scene(t, size, seed=3, motion="mixed")
    assert np.array_equal(mixed, again)                  # the default scene is unchanged
    _, drift, _ = render_scene(t, size, seed=3, motion="drift")
    assert drift.reshape(t, drift.shape[1], -1).any(-1).all()   # every object always visible
    _, cross, _ = render_scene(t, size, seed=3, num_objects=3, motion="cross")
    area = cross.reshape(t, 3, -1).sum(-1)
    # objects meet in the middle of the clip: visible area drops there (occlusion)
    assert area[t // 2].sum() < 0.9 * area[0].sum()
    with pytest.raises(ValueError):
        render_scene(2, size, motion="spiral")


def test_bench_rows_for_int8_next_to_fp32(int8_bundle, tiny_bundle, demo_mp4, tmp_path):
    from dvis_trt.runtime.cli import main

    out = tmp_path / "bench"
    # torch in --backends with --no-baseline: refused in one line before any work
    assert main(["bench", str(tiny_bundle), str(demo_mp4.path), "--no-baseline",
                 "--backends", "torch,ort", "--out", str(out)]) == 2
    assert not out.exists()
    # --no-baseline: no eager model; the int8 row is judged against its fp32 twin all the same
    main(["bench", str(tiny_bundle), str(int8_bundle[0].root), str(demo_mp4.path),
          "--no-baseline", "--backends", "ort", "--frames", "8",
          "--warmup", "1", "--repeats", "1", "--no-stages", "--no-flops", "--memory", "off",
          "--gemm-seconds", "0.05", "--gemm-sizes", "128", "--out", str(out), "--quiet"])
    rec = json.loads((out / "bench.json").read_text())["runs"][-1]
    fp32, int8 = rec["e2e"]["ort[msda=onnx]"], rec["e2e"]["ort[msda=onnx,int8]"]
    assert fp32["precision"] == "fp32" and int8["precision"] == "int8"
    assert fp32["parity"]["reason"] == "no eager baseline" and "wall_s" in fp32
    assert "torch" not in rec["e2e"] and rec["settings"]["weights"] == "none: --no-baseline"
    acc = int8["parity"]["accuracy"]                  # the accuracy report, not fp32 bounds
    assert acc["verdict"].startswith(("PASS", "FAIL")) and 0 <= acc["matched_fraction"] <= 1
    assert int8["valid"] == acc["verdict"].startswith("PASS")
    assert int8["parity"]["against"] == "ort[msda=onnx]"    # judged against its fp32 twin
    # timed whatever the verdict, with its ratio against the fp32 twin of the same rounds
    assert "wall_s" in int8 and "ort[msda=onnx,int8] vs ort[msda=onnx]" in rec["ratios"]
    md = (out / "bench.md").read_text()
    assert "ort[msda=onnx,int8]" in md
    assert ("accuracy OK vs" in md) == int8["valid"] and "matched" in md


def test_ort_graph_cache_hit_gives_identical_outputs(tiny_bundle, tmp_path, monkeypatch):
    from dvis_trt.runtime.backends.ort_backend import OrtBackend, default_graph_cache
    from dvis_trt.runtime.bundle import load_manifest

    monkeypatch.setenv("DVIS_TRT_ORT_GRAPH_CACHE", "off")
    assert default_graph_cache() is None
    monkeypatch.setenv("DVIS_TRT_ORT_GRAPH_CACHE", str(tmp_path / "g"))
    assert default_graph_cache() == str(tmp_path / "g")
    m = load_manifest(tiny_bundle)
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 160)).astype(np.float32)
    outs, hits = [], []
    for cache in (None, "auto", "auto"):
        b = OrtBackend("cpu", threads=1, graph_cache=cache)
        b.load_all(m)
        outs.append(b.run("segmenter", {"images": x}))
        hits.append({k: v[1] for k, v in b.session_seconds.items()})
        b.close()
    assert not any(hits[0].values()) and not any(hits[1].values()) and all(hits[2].values())
    assert len(list((tmp_path / "g").glob("*.ort.onnx"))) == len(m.stages)
    assert not [p for p in (tmp_path / "g").iterdir() if "dvis-trt-tmp" in p.name]
    for k in outs[0]:
        np.testing.assert_array_equal(outs[2][k], outs[0][k])
    # a cached graph ORT cannot load (an older version's entry, a damaged file) is dropped
    # and the stage loads from the bundle, with the same outputs
    seg = [p for p in (tmp_path / "g").glob("segmenter-*.ort.onnx")]
    assert len(seg) == 1
    seg[0].write_bytes(b"not an onnx graph")
    b = OrtBackend("cpu", threads=1, graph_cache="auto")
    b.load_all(m)
    assert b.session_seconds["segmenter"][1] is False
    again = b.run("segmenter", {"images": x})
    b.close()
    for k in outs[0]:
        np.testing.assert_array_equal(again[k], outs[0][k])
    assert seg[0].stat().st_size > 1000               # rewritten by the fresh session
    # graphs with ONNX external data (ViT-L) are not cached: ORT's saved graph would point
    # at a data file that is not in the cache folder
    import dataclasses
    big = dataclasses.replace(m, stages={**m.stages, "segmenter": dataclasses.replace(
        m.stages["segmenter"], data_file="segmenter.onnx.data")})
    assert OrtBackend("cpu", graph_cache="auto")._graph_cache_paths("segmenter", big) is None
    assert OrtBackend("cpu", graph_cache="auto")._graph_cache_paths("refiner", big) is not None


def test_ort_graph_cache_is_kept_under_its_size_cap(tmp_path, monkeypatch):
    """Least recently used entries go first, the entry in use stays, only the cache's own
    names are deleted, and temporaries of dead processes are removed."""
    import os
    import subprocess
    import sys

    from dvis_trt.errors import InputError
    from dvis_trt.runtime.backends.ort_backend import graph_cache_max_bytes, prune_graph_cache

    g = tmp_path / "g"
    g.mkdir()
    names = [f"segmenter-{i:024x}.ort.onnx" for i in range(4)]
    for age, name in enumerate(names):                 # names[0] is the newest
        p = g / name
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1e9 - age * 100, 1e9 - age * 100))
    user = g / "notes.ort.onnx"                        # not of the cache's form: never touched
    user.write_bytes(b"y" * 5000)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = g / f".{names[0]}.dvis-trt-tmp-{dead}-0123abcd.onnx"
    orphan.write_bytes(b"z" * 10)
    os.utime(orphan, (1e9, 1e9))
    removed = prune_graph_cache(g, max_bytes=2500, keep=str(g / names[3]))
    left = sorted(p.name for p in g.iterdir())
    # 4000 bytes of entries, cap 2500: the two oldest go, but names[3] (oldest) is in use,
    # so names[2] and names[1] go instead
    assert left == sorted([names[0], names[3], user.name])
    assert len(removed) == 3 and str(orphan) in removed
    monkeypatch.setenv("DVIS_TRT_ORT_GRAPH_CACHE_MAX_GB", "0.5")
    assert graph_cache_max_bytes() == 500_000_000
    for bad in ("0", "-1", "nan", "lots"):
        monkeypatch.setenv("DVIS_TRT_ORT_GRAPH_CACHE_MAX_GB", bad)
        with pytest.raises(InputError, match="DVIS_TRT_ORT_GRAPH_CACHE_MAX_GB"):
            graph_cache_max_bytes()


def test_quantize_a_bundle_whose_segmenter_has_external_data(tiny_bundle, demo_mp4, tmp_path,
                                                             monkeypatch):
    """ViT-L's fp32 segmenter (~1.4 GB) is saved with ONNX external data: quantize copies the
    data file with the graph, calibrates through it, and the manifest records the int8
    graph's own layout (external when large, else one file and no stale data file)."""
    import dataclasses
    import shutil

    import onnx

    from dvis_trt.export import onnx_io
    from dvis_trt.export.quantize import quantize_bundle
    from dvis_trt.runtime.backends.ort_backend import OrtBackend
    from dvis_trt.runtime.bundle import load_manifest, write_manifest

    src = tmp_path / "fp32_ext"
    shutil.copytree(tiny_bundle, src)
    m = load_manifest(src)
    seg = m.stages["segmenter"]
    assert onnx_io.save_graph(onnx.load(str(src / seg.file)), src / seg.file,
                              threshold=0) == "segmenter.onnx.data"
    write_manifest(src, dataclasses.replace(
        m, root=None, stages={**m.stages, "segmenter": dataclasses.replace(
            seg, data_file="segmenter.onnx.data")}), hash_files=True)
    assert load_manifest(src).stages["segmenter"].data_file == "segmenter.onnx.data"

    one = tmp_path / "int8_one_file"
    man, _ = quantize_bundle(src, one, [demo_mp4.path], num_frames=2, report=False)
    assert man.stages["segmenter"].data_file is None
    assert not (one / "segmenter.onnx.data").exists()
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 50_000)
    ext = tmp_path / "int8_external"
    man, _ = quantize_bundle(src, ext, [demo_mp4.path], num_frames=2, report=False)
    assert man.stages["segmenter"].data_file == "segmenter.onnx.data"
    assert onnx_io.external_data_file(ext / "segmenter.onnx") == "segmenter.onnx.data"

    feed = {"images": np.random.default_rng(0).standard_normal((1, 3, 64, 96), np.float32)}
    outs = []
    for root in (one, ext):
        verified = load_manifest(root)  # both files' sha256 checked
        g = onnx.load(str(root / "segmenter.onnx"))
        assert sum(n.op_type == "QuantizeLinear" for n in g.graph.node) > 0
        with OrtBackend(("cpu",), threads=2, graph_cache=None) as b:
            b.load_stage("segmenter", verified)
            outs.append(b.run("segmenter", feed))
    for name in outs[0]:  # the same calibration frames give the same int8 graph
        np.testing.assert_array_equal(outs[0][name], outs[1][name])


def test_int8_saturation_warning_needs_full_range_weights_and_a_cpu_without_vnni():
    from types import SimpleNamespace

    from dvis_trt.runtime.backends.ort_backend import int8_saturation_warning

    def bundle(precision="int8", reduce_range=False):
        return SimpleNamespace(precision=precision, root="b/",
                               producer={"quantization": {"reduce_range": reduce_range}})

    avx2 = "flags : fpu sse2 avx avx2 fma"
    assert "--reduce-range" in int8_saturation_warning(bundle(), avx2)
    assert int8_saturation_warning(bundle(), avx2 + " avx512f avx512_vnni") is None
    assert int8_saturation_warning(bundle(), avx2 + " avx_vnni") is None
    assert int8_saturation_warning(bundle(reduce_range=True), avx2) is None
    assert int8_saturation_warning(bundle(precision="fp32"), avx2) is None
    assert int8_saturation_warning(bundle(), "") is None          # not x86 Linux: nothing known


def test_chunked_calibration_gives_ort_s_ranges_and_the_same_graph(tiny_bundle, int8_bundle,
                                                                    demo_mp4, tmp_path, caplog):
    """Calibrating a few tensors per pass (how ViT-L fits in memory) computes exactly the
    ranges of ORT's one-pass MinMax calibration, so the quantized graph is the same."""
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    from dvis_trt.export import quantize as q
    from dvis_trt.runtime.bundle import load_manifest

    m = load_manifest(tiny_bundle)
    src = str(m.stage_path("segmenter"))
    name = onnx.load(src).graph.input[0].name
    two = q.load_calibration([demo_mp4.path], m.config.to_dict(), 2).samples
    full = MinMaxCalibrater(src, op_types_to_calibrate=list(q._QUANT_OPS),
                            augmented_model_path=str(tmp_path / "aug.onnx"))
    full.augment_graph()
    full.create_inference_session()
    full.collect_data(type("R", (q._Reader, CalibrationDataReader), {})(name, two))
    want = full.compute_data()
    (tmp_path / "w").mkdir()
    got = q.chunked_minmax_ranges(src, name, two, False, str(tmp_path / "w"), chunk=16)
    assert len(list(want.keys())) > 32 and sorted(got.keys()) == sorted(want.keys())
    for k in want.keys():
        np.testing.assert_array_equal(np.asarray(got[k].range_value),
                                      np.asarray(want[k].range_value), err_msg=k)
    assert not [f for f in (tmp_path / "w").iterdir() if f.name.startswith("augmented_")]
    # the whole quantization, chunked, on the frames the int8_bundle fixture (one pass) used
    six = q.load_calibration([demo_mp4.path], m.config.to_dict(), 6).samples
    caplog.clear()
    dst = tmp_path / "int8_chunked.onnx"
    q.quantize_model(src, dst, six, calibration_chunk=len(list(want.keys())) // 2 + 1)
    # ORT's root-logger advice ("consider pre-processing") does not reach the user
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    one = int8_bundle[0]
    graphs = [{i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}
              for p in (one.stage_path("segmenter"), dst)]
    assert graphs[0].keys() == graphs[1].keys()
    for k in graphs[0]:
        np.testing.assert_array_equal(graphs[0][k], graphs[1][k], err_msg=k)