"""Per-stage ONNX export (``export/onnx_export.py``, ``export/stages.py``, the export / check CLIs).

A reduced config (``export/configs/tiny.yaml``: every code path of the R50 OVIS model with tiny
widths) is exported once through ``dvis-trt export`` with a seeded random checkpoint; then every
stage runs in ONNX Runtime and in eager PyTorch on the same realistic inputs (chained through
the eager stages from random images) at two resolutions and two window lengths, with
``tQ = 0, 1, many`` live tracks, and two refiner / mask-head sizes. ONNX Runtime and PyTorch
are independent implementations of every kernel, so a wrong op, a baked-in shape or a lost
dynamic axis shows up as an O(1) difference or a runtime error.

Tolerance (all parity tests): ``max|ort - torch| <= 1e-5 + 1e-4 * max|torch|`` per output.
Measured differences are ~1e-6 of the output's scale (fp32 summation order over the ~40
layers of the tiny segmenter); 1e-4 leaves ~100x headroom for other CPUs' kernels, while a real
export error is >= 1e-2 of the scale. The ``sigmoid > 0.5`` binarisations inside the stages
(masked attention, mask pooling) could in principle flip a pixel whose logit lies within
~1e-6 of 0 and exceed this; the inputs are seeded, so a run that passes keeps passing.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dvis_trt.export import cli_check, cli_export
from dvis_trt.export.checkpoint import write_random_checkpoint
from dvis_trt.export.model.build import build_model
from dvis_trt.export.model.layers import masked_attention_bias
from dvis_trt.export.onnx_checks import FORBIDDEN_OPS, ExportError, check_graph
from dvis_trt.export.onnx_export import EXPORTER, export_bundle
from dvis_trt.export.onnx_io import replace_dir
from dvis_trt.export.sample_inputs import SampleDims, sample_stage_inputs, tracker_step_inputs
from dvis_trt.export.stages import build_stages, eager_runner, run_stage_eager
from dvis_trt.runtime.backends.ort_backend import OrtBackend
from dvis_trt.export.config import load_config
from dvis_trt.errors import InputError
from dvis_trt.runtime.bundle import EXPORT_STAGE_NAMES, load_manifest, stage_specs

STAGE_NAMES = EXPORT_STAGE_NAMES  # offline stages + the online mode's tracker_masks

TINY = Path(__file__).resolve().parents[1] / "export" / "configs" / "tiny.yaml"
RTOL, ATOL = 1e-4, 1e-5


def assert_parity(got: dict, ref: dict, where: str) -> None:
    assert sorted(got) == sorted(ref), where
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{where} {name}: {g.shape} vs {r.shape}"
        assert g.dtype == r.dtype, f"{where} {name}: {g.dtype} vs {r.dtype}"
        if r.size == 0:
            continue
        assert np.isfinite(g).all(), f"{where} {name}: non-finite values"
        err = float(np.abs(g.astype(np.float64) - r).max())
        scale = float(np.abs(r).max())
        assert err <= ATOL + RTOL * scale, f"{where} {name}: max-abs {err:.3e} (scale {scale:.3e})"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cfg, eager model with the checkpoint's weights, stage modules, manifest) of a bundle
    written by ``dvis-trt export`` (CLI code path) from a seeded random checkpoint."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(TINY)
    ckpt = write_random_checkpoint(lambda: build_model(cfg), tmp / "tiny.pth", seed=0)
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)
    args = parser.parse_args(["--config-file", str(TINY), "--checkpoint", str(ckpt),
                              "--output", str(tmp / "bundle"), "--window", "3"])
    assert cli_export.run(args) == 0
    model = build_model(cfg)
    from dvis_trt.export.checkpoint import load_checkpoint
    load_checkpoint(model, ckpt)
    stages = build_stages(model)
    manifest = load_manifest(tmp / "bundle")
    return {"cfg": cfg, "model": model, "stages": stages, "manifest": manifest, "ckpt": ckpt,
            "tmp": tmp}


@pytest.fixture(scope="module")
def ort_backend(exported):
    b = OrtBackend("cpu", threads=2)
    b.load_all(exported["manifest"])
    yield b
    b.close()


def constants(manifest):
    with np.load(manifest.root / manifest.constants.file) as npz:
        return {k: npz[k] for k in npz.files}


# ----------------------------------------------------------------------------- bundle content
def test_bundle_layout_and_manifest(exported):
    man = exported["manifest"]
    model = exported["model"]
    assert set(man.stages) == set(STAGE_NAMES)
    assert man.msda == "onnx" and man.producer["opset"] == 17
    assert man.producer["exporter"] == {s: "torchscript" for s in STAGE_NAMES} == EXPORTER
    assert man.producer["torch"] == torch.__version__
    # the manifest's I/O is the canonical contract with this config's numbers
    specs = stage_specs(**man.config.dims)
    for s in STAGE_NAMES:
        assert man.stages[s].inputs == specs[s][0] and man.stages[s].outputs == specs[s][1]
    assert man.config.num_queries == model.sem_seg_head.predictor.num_queries
    # checksums verified by load_manifest; tampering is caught
    load_manifest(man.root, verify=True)
    c = constants(man)
    np.testing.assert_array_equal(c["bg_slots"], model.tracker.bg_slots.weight.detach().numpy())
    np.testing.assert_array_equal(c["seg_query_feat"],
                                  model.sem_seg_head.predictor.query_feat.weight.detach().numpy())
    assert man.constants.arrays == {k: v.shape for k, v in c.items()}


def test_graphs_are_tensorrt_friendly(exported):
    """Checker (full) passes; no bool I/O, no NonZero / ScatterND / Einsum anywhere; graph I/O
    carries the manifest's symbolic dims; the masked-attention rule exported as Where."""
    man = exported["manifest"]
    all_ops = set()
    for name, spec in man.stages.items():
        path = str(man.stage_path(name))
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        check_graph(model, name, spec.inputs, spec.outputs, "onnx")
        ops = {n.op_type for n in model.graph.node}
        assert not ops & set(FORBIDDEN_OPS), (name, ops & set(FORBIDDEN_OPS))
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        for vi, t in zip(list(model.graph.input) + list(model.graph.output),
                         spec.inputs + spec.outputs):
            assert vi.type.tensor_type.elem_type != onnx.TensorProto.BOOL
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert dims == [str(d) if isinstance(d, str) else d for d in t.shape], (name, vi.name)
        all_ops |= ops
    seg_ops = {n.op_type for n in onnx.load(str(man.stage_path("segmenter"))).graph.node}
    assert {"GridSample", "Where"} <= seg_ops        # MSDA in pure ONNX; masked attention
    assert "Einsum" not in all_ops and "MatMul" in all_ops


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("frames,height,width", [(1, 96, 160), (3, 128, 96)])
def test_segmenter_parity_two_resolutions_two_windows(exported, ort_backend, frames, height,
                                                      width):
    rng = np.random.default_rng(frames)
    images = rng.standard_normal((frames, 3, height, width), dtype=np.float32)
    images[..., height - 32:, :] = 0.0   # padding rows, as preprocessing leaves them
    ref = run_stage_eager(exported["stages"]["segmenter"], "segmenter", {"images": images})
    got = ort_backend.run("segmenter", {"images": images})
    assert got["mask_features"].shape == (frames, 32, height // 4, width // 4)
    assert_parity(got, ref, f"segmenter T={frames} {height}x{width}")


@pytest.fixture(scope="module")
def chained(exported):
    """Realistic inputs for every stage (through the eager stages), two size sets."""
    run = eager_runner(exported["stages"])
    c = constants(exported["manifest"])
    small = sample_stage_inputs(run, SampleDims(frames=2, height=64, width=96, tracks=3,
                                                refiner_frames=1, mask_frames=1,
                                                mask_queries=1), c, seed=0)
    large = sample_stage_inputs(run, SampleDims(frames=2, height=96, width=128, tracks=7,
                                                refiner_frames=9, refiner_queries=5,
                                                mask_frames=4, mask_queries=5), c, seed=1)
    return small, large, c


@pytest.mark.parametrize("tracks", [0, 1, 27])
def test_tracker_step_parity_track_counts(exported, ort_backend, chained, tracks):
    small, _, c = chained
    first = run_stage_eager(exported["stages"]["tracker_first"], "tracker_first",
                            small["tracker_first"])
    frame = {k: small["tracker_step"][k] for k in ("frame_embeds", "mask_pooled",
                                                   "mask_features")}
    feed = tracker_step_inputs(first, frame, c, tracks, np.random.default_rng(tracks))
    ref = run_stage_eager(exported["stages"]["tracker_step"], "tracker_step", feed)
    got = ort_backend.run("tracker_step", feed)
    n = exported["manifest"].config.num_new_ins
    assert got["embeds"].shape == (tracks + n, 32)
    assert got["slot_logits"].shape == (tracks, 26)
    assert_parity(got, ref, f"tracker_step tQ={tracks}")


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("stage", ["tracker_first", "refiner", "mask_head"])
def test_other_stages_parity(exported, ort_backend, chained, stage, which):
    feed = chained[which][stage]
    ref = run_stage_eager(exported["stages"][stage], stage, feed)
    got = ort_backend.run(stage, feed)
    assert_parity(got, ref, f"{stage} case {which}")


def test_mask_head_matches_direct_formula(ort_backend, chained):
    """Independent check of one stage against the official einsum written in numpy."""
    feed = chained[1]["mask_head"]
    got = ort_backend.run("mask_head", feed)["pred_masks"]
    want = np.einsum("tqc,tchw->qthw", feed["mask_embed"].astype(np.float64),
                     feed["mask_features"].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- masked attention
class _BiasModule(torch.nn.Module):
    def forward(self, mask_logits):
        return masked_attention_bias(mask_logits, 4)


def test_masked_attention_rule_exports_as_where(tmp_path):
    """The official rule (block sigmoid < 0.5; a query with every key blocked is unblocked;
    per-head repeat) exports without NonZero/ScatterND and matches the official index
    assignment, rows that are all blocked included, at a length other than the traced one."""
    import onnxruntime as ort

    path = tmp_path / "bias.onnx"
    x = torch.randn(2, 5, 12)
    with warnings.catch_warnings():   # the TorchScript exporter's deprecation: chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_BiasModule(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["m"], output_names=["bias"],
                          dynamic_axes={"m": {0: "B", 1: "Q", 2: "K"},
                                        "bias": {0: "BH", 1: "Q", 2: "K"}})
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "Where" in ops and not ops & {"NonZero", "ScatterND"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    m = torch.randn(3, 6, 20)
    m[0, 2] = -3.0       # every key blocked -> unblocked
    m[1, 4] = 3.0        # nothing blocked
    got = sess.run(None, {"m": m.numpy()})[0]
    # official: bool mask, index assignment, repeat per head
    attn = (m.sigmoid() < 0.5).unsqueeze(1).repeat(1, 4, 1, 1).flatten(0, 1)
    attn[torch.where(attn.sum(-1) == attn.shape[-1])] = False
    want = torch.zeros(attn.shape).masked_fill(attn, float("-inf")).numpy()
    np.testing.assert_array_equal(got, want)
    assert (got[0:4, 2] == 0).all()      # batch 0 query 2 (all blocked), every head: unblocked
    assert (got[4:8, 4] == 0).all()      # batch 1 query 4: nothing blocked
    assert np.isinf(got).any()           # ... while other queries do block keys


# ----------------------------------------------------------------------------- checks that fail
def _graph(op: str, in_type=onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    from onnx import helper as h
    x = h.make_tensor_value_info("x", in_type, ["n"])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])
    if op == "NonZero":
        nodes = [h.make_node("NonZero", ["x"], ["nz"]),
                 h.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)]
    else:
        nodes = [h.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)]
    return h.make_model(h.make_graph(nodes, "g", [x], [y]))


def test_check_graph_rejects_what_tensorrt_cannot_take():
    from dvis_trt.runtime.bundle import TensorSpec
    ins, outs = (TensorSpec("x", "float32", ("n",)),), (TensorSpec("y", "float32", ("n",)),)
    check_graph(_graph("Cast"), "s", ins, outs, "onnx")
    with pytest.raises(ExportError, match="NonZero"):
        check_graph(_graph("NonZero"), "s", ins, outs, "onnx")
    with pytest.raises(ExportError, match="bool"):
        check_graph(_graph("Cast", onnx.TensorProto.BOOL), "s", ins, outs, "onnx")
    with pytest.raises(ExportError, match="inputs"):
        check_graph(_graph("Cast"), "s", (TensorSpec("images", "float32", ("n",)),), outs,
                    "onnx")


# ----------------------------------------------------------------------------- atomic replace
def test_reexport_replaces_bundle_atomically(exported, tmp_path, monkeypatch):
    model, cfg = exported["model"], exported["cfg"]
    out = tmp_path / "b"
    subset = ["refiner", "mask_head"]   # cheap stages; the mechanism is the same
    export_bundle(model, cfg, out, window=1, example_size=(64, 64), stages=subset)
    (out / "engines").mkdir()
    (out / "engines" / "stale.engine").write_bytes(b"x")
    first_sha = load_manifest(out, require_stages=subset).stages["refiner"].sha256
    man = export_bundle(model, cfg, out, window=1, example_size=(64, 64), stages=subset,
                        opset=18)
    assert man.producer["opset"] == 18
    assert not (out / "engines").exists()            # stale engines went with the old bundle
    assert load_manifest(out, require_stages=subset).stages["refiner"].sha256 != first_sha
    assert [p.name for p in tmp_path.iterdir()] == ["b"]   # no temp folders left

    # a failure half-way leaves the previous bundle untouched and no temp folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from dvis_trt.export import onnx_export
    real = onnx_export.export_stage

    def fail_second(module, stage, *a, **k):
        if stage == "mask_head":
            raise ExportError("simulated failure")
        return real(module, stage, *a, **k)

    monkeypatch.setattr(onnx_export, "export_stage", fail_second)
    with pytest.raises(ExportError, match="simulated"):
        export_bundle(model, cfg, out, window=1, example_size=(64, 64), stages=subset)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(exported, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"precious")
    with pytest.raises(InputError, match="not a dvis-trt bundle"):
        export_bundle(exported["model"], exported["cfg"], other, stages=["mask_head"])
    assert (other / "keep.jpg").read_bytes() == b"precious"
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(InputError, match="not a dvis-trt bundle"):
        replace_dir(new, other)


def test_bad_options_fail_with_one_line(exported, tmp_path):
    for kw, msg in (({"msda": "cuda"}, "--msda"), ({"opset": 15}, "--opset"),
                    ({"window": 0}, "--window"), ({"example_size": (100, 64)}, "multiples")):
        with pytest.raises(InputError, match=msg):
            export_bundle(exported["model"], exported["cfg"], tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- check CLI
def test_check_command_prints_table_and_passes(exported, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli_check.add_arguments(parser)
    out_json = tmp_path / "check.json"
    args = parser.parse_args([str(exported["manifest"].root), "--checkpoint",
                              str(exported["ckpt"]), "--size", "64x96", "--tracks", "0,1,4",
                              "--refiner-frames", "3", "--mask-frames", "2", "--threads", "2",
                              "--json", str(out_json)])
    assert cli_check.run(args) == 0
    text = capsys.readouterr().out
    assert "max-abs" in text and "max-rel" in text and "FAIL" not in text
    rows = json.loads(out_json.read_text())["rows"]
    seen = {(r["stage"], r["case"]) for r in rows}
    assert {("tracker_step", "tQ=0"), ("tracker_step", "tQ=1"), ("tracker_step", "tQ=4")} <= seen
    assert {r["stage"] for r in rows} == set(STAGE_NAMES)
    assert all(r["ok"] for r in rows)


def test_check_flags_a_wrong_graph(exported, tmp_path):
    """The check can fail: a bundle whose refiner graph comes from other weights."""
    import shutil
    from dvis_trt.runtime.bundle import write_manifest

    bad = tmp_path / "bad"
    shutil.copytree(exported["manifest"].root, bad)
    other = build_model(exported["cfg"])    # fresh random weights
    export_bundle(other, exported["cfg"], tmp_path / "other", window=1,
                  example_size=(64, 64), stages=["refiner"])
    shutil.copy(tmp_path / "other" / "refiner.onnx", bad / "refiner.onnx")
    write_manifest(bad, load_manifest(bad, verify=False), hash_files=True)
    parser = argparse.ArgumentParser()
    cli_check.add_arguments(parser)
    args = parser.parse_args([str(bad), "--checkpoint", str(exported["ckpt"]), "--size",
                              "64x64", "--tracks", "2", "--stages", "refiner"])
    assert cli_check.run(args) == 1


def test_check_needs_checkpoint_for_torch_reference(exported, tmp_path):
    """Without --checkpoint the torch side uses the one the manifest records; when that file
    is gone, one line asks for --checkpoint (tests/test_provenance.py covers the rest)."""
    import json
    import shutil
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["manifest"].root, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["producer"]["checkpoint"]["path"] = str(tmp_path / "gone.pth")
    (bundle / "manifest.json").write_text(json.dumps(m))
    parser = argparse.ArgumentParser()
    cli_check.add_arguments(parser)
    args = parser.parse_args([str(bundle)])
    with pytest.raises(InputError, match="not there any more; pass --checkpoint"):
        cli_check.run(args)


# ----------------------------------------------------------------------------- full R50
R50 = Path(os.environ.get("DVIS_TRT_R50_CONFIG",
                          "/work/shared/reference/configs/dvis_daq/ovis/DAQ_Offline_R50.yaml"))


@pytest.mark.slow
@pytest.mark.skipif(not R50.is_file(), reason=f"R50 OVIS config not found at {R50}")
def test_full_r50_export_and_parity(tmp_path):
    """The full R50 OVIS offline config exports (random weights) and every stage matches eager
    PyTorch in ONNX Runtime at a real resolution (minutes on 2 cores)."""
    cfg = load_config(R50)
    ckpt = write_random_checkpoint(lambda: build_model(cfg), tmp_path / "r50.pth", seed=0)
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)
    args = parser.parse_args(["--config-file", str(R50), "--checkpoint", str(ckpt), "--output",
                              str(tmp_path / "bundle"), "--window", "2",
                              "--example-size", "320x544"])
    assert cli_export.run(args) == 0
    parser = argparse.ArgumentParser()
    cli_check.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "bundle"), "--checkpoint", str(ckpt),
                              "--size", "480x864", "--frames", "1", "--tracks", "0,1,20"])
    assert cli_check.run(args) == 0


def test_check_skips_stages_an_older_bundle_lacks(exported, tmp_path):
    """A bundle exported before the online ``tracker_masks`` stage existed still checks:
    only the stages the manifest lists are compared (it used to stop with 'stage not loaded')."""
    import dataclasses
    import shutil
    from dvis_trt.runtime.bundle import write_manifest

    old = tmp_path / "old"
    shutil.copytree(exported["manifest"].root, old)
    m = load_manifest(old, verify=False)
    if "tracker_masks" in m.stages:
        stages = {k: v for k, v in m.stages.items() if k != "tracker_masks"}
        write_manifest(old, dataclasses.replace(m, stages=stages), hash_files=True)
    parser = argparse.ArgumentParser()
    cli_check.add_arguments(parser)
    args = parser.parse_args([str(old), "--checkpoint", str(exported["ckpt"]), "--size",
                              "64x96", "--tracks", "1", "--threads", "2"])
    assert cli_check.run(args) == 0
