"""engine/manifest.py staleness rules, engine folders, and the builder's CPU-side refusals."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from dvis_trt.runtime.bundle import engines as EM
from dvis_trt.engine.profiles import BuildLimits, derive_profiles
from dvis_trt.runtime import bundle as M
from dvis_trt.errors import BundleError
from dvis_trt.fileio import sha256_file

CONFIG = {"num_classes": 3, "num_queries": 4, "hidden_dim": 8, "mask_dim": 8,
          "num_new_ins": 4, "num_slots": 2, "pixel_mean": [0.0, 0.0, 0.0],
          "pixel_std": [1.0, 1.0, 1.0], "min_size_test": 64, "max_size_test": 128,
          "size_divisibility": 32, "inference_select_threshold": 0.1,
          "aux_inference_select_threshold": 0.01, "dis_fg_threshold": 0.01,
          "ovis_infer": True, "noise_frame_num": 2, "offline_topk_num": 2, "max_num": 3,
          "refiner_window_size": 3}

H200 = EM.MachineInfo("11.1.0", "NVIDIA H200", "9.0")


def make_bundle(tmp_path, msda="plugin", precision="fp16"):
    specs = M.stage_specs(4, 8, 3, 4, 2)
    stages = {}
    for name, (ins, outs) in specs.items():
        (tmp_path / f"{name}.onnx").write_bytes(name.encode())
        stages[name] = M.StageSpec(name, f"{name}.onnx", "0" * 64, ins, outs)
    m = M.BundleManifest(config=M.InferenceConfig.from_dict(CONFIG), stages=stages, msda=msda,
                         precision=precision)
    return M.write_manifest(tmp_path, m)


def make_engines(bundle, machine=H200, plugin_sha="a" * 64, write=True):
    profiles = derive_profiles(bundle, BuildLimits(resolutions=("64x64",)))
    edir = bundle.root / "engines" / EM.engine_dir_name(machine, bundle.precision)
    edir.mkdir(parents=True, exist_ok=True)
    stages = {}
    for name, spec in bundle.stages.items():
        (edir / f"{name}.engine").write_bytes(b"plan " + name.encode())
        stages[name] = EM.StageEngine(f"{name}.engine",
                                      sha256_file(edir / f"{name}.engine"), spec.sha256,
                                      tuple(profiles[name]))
    em = EM.EngineManifest(machine.trt_version, machine.gpu_name, machine.compute_capability,
                           bundle.precision, bundle.msda, stages,
                           plugin_library={"name": "libdvis_msda_trt.so",
                                           "path": "/x/libdvis_msda_trt.so",
                                           "sha256": plugin_sha} if plugin_sha else None)
    if write:
        EM.write_engine_manifest(edir, em)
        em = EM.load_engine_manifest(edir)
    return em


def test_names():
    assert EM.gpu_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert EM.gpu_slug("Orin (nvgpu)") == "orin-nvgpu"
    assert EM.engine_dir_name(H200, "fp16") == "nvidia-h200-sm90-trt11.1.0-fp16"
    assert EM.engine_dir_name(EM.MachineInfo("10.3.0", "Orin", "8.7"), "bf16") == \
        "orin-sm87-trt10.3.0-bf16"
    assert EM.engine_dir_name(H200, "int8") == "nvidia-h200-sm90-trt11.1.0-int8"
    with pytest.raises(ValueError):
        EM.engine_dir_name(H200, "int4")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_fresh_engines_pass(tmp_path, precision):
    b = make_bundle(tmp_path, precision=precision)
    em = make_engines(b)
    assert em.root.name.endswith(f"-{precision}")
    assert EM.staleness_reasons(em, b, H200, "a" * 64) == []
    EM.check_fresh(em, b, H200, "a" * 64)
    assert EM.find_engine_dir(b, H200) == em.root
    # engines of the other precision are never picked for this bundle
    other = dataclasses.replace(b, precision="fp32")
    assert any(f"precision {precision}" in r
               for r in EM.staleness_reasons(em, other, H200, "a" * 64))


@pytest.mark.parametrize("machine, plugin, expect", [
    (EM.MachineInfo("10.3.0", "NVIDIA H200", "9.0"), "a" * 64, "TensorRT 11.1.0"),
    (EM.MachineInfo("11.1.0", "NVIDIA H100 80GB HBM3", "9.0"), "a" * 64, "GPU 'NVIDIA H200'"),
    (EM.MachineInfo("11.1.0", "NVIDIA H200", "8.9"), "a" * 64, "compute capability 9.0"),
    (H200, "b" * 64, "plugin library libdvis_msda_trt.so"),
    (H200, None, "does not load"),
])
def test_each_machine_rule(tmp_path, machine, plugin, expect):
    b = make_bundle(tmp_path)
    em = make_engines(b)
    reasons = EM.staleness_reasons(em, b, machine, plugin)
    assert len(reasons) == 1 and expect in reasons[0], reasons
    with pytest.raises(BundleError) as err:
        EM.check_fresh(em, b, machine, plugin)
    msg = str(err.value)
    assert "engine built for" in msg and f"run `dvis-trt build {b.root}`" in msg
    assert "\n" not in msg


def test_bundle_side_rules(tmp_path):
    b = make_bundle(tmp_path)
    em = make_engines(b)
    # re-exported stage: new ONNX hash
    (tmp_path / "refiner.onnx").write_bytes(b"re-exported")
    b2 = M.write_manifest(tmp_path, b)
    reasons = EM.staleness_reasons(em, b2, H200, "a" * 64)
    assert len(reasons) == 1 and "'refiner' ONNX" in reasons[0]
    # precision / msda changed
    b3 = dataclasses.replace(b, precision="fp32")
    assert any("precision fp16" in r for r in EM.staleness_reasons(em, b3, H200, "a" * 64))
    b4 = dataclasses.replace(b, msda="trt-builtin")
    assert any("--msda plugin" in r for r in EM.staleness_reasons(em, b4, H200, "a" * 64))
    # a stage without an engine
    em2 = dataclasses.replace(em, stages={k: v for k, v in em.stages.items()
                                          if k != "mask_head"})
    assert EM.staleness_reasons(em2, b, H200, "a" * 64) == ["no 'mask_head' engine"]
    # engines built without a plugin library don't care about one
    em3 = dataclasses.replace(em, plugin_library=None)
    assert EM.staleness_reasons(em3, b, H200, None) == []


def test_engine_manifest_files(tmp_path):
    b = make_bundle(tmp_path)
    em = make_engines(b)
    assert em.stages["segmenter"].profiles[0].name == "64x64"
    EM.load_engine_manifest(em.root, verify=True)
    (em.root / "refiner.engine").write_bytes(b"corrupt")
    EM.load_engine_manifest(em.root)  # present, hash not checked
    with pytest.raises(BundleError, match="corrupt"):
        EM.load_engine_manifest(em.root, verify=True)
    (em.root / "refiner.engine").unlink()
    with pytest.raises(BundleError, match="refiner.engine"):
        EM.load_engine_manifest(em.root)
    (em.root / "engines.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(BundleError, match="malformed"):
        EM.load_engine_manifest(em.root)
    (em.root / "engines.json").unlink()
    with pytest.raises(BundleError, match="interrupted build"):
        EM.load_engine_manifest(em.root)


def test_find_engine_dir_names_other_builds(tmp_path):
    b = make_bundle(tmp_path)
    make_engines(b, machine=EM.MachineInfo("10.3.0", "Orin", "8.7"))
    with pytest.raises(BundleError) as err:
        EM.find_engine_dir(b, H200)
    msg = str(err.value)
    assert "orin-sm87-trt10.3.0-fp16" in msg and "dvis-trt build" in msg


def test_builder_refuses_gridsample_bundle_without_tensorrt(tmp_path):
    from dvis_trt.engine import builder
    b = make_bundle(tmp_path, msda="onnx")
    with pytest.raises(BundleError, match="--allow-gridsample"):
        builder.build_engines(tmp_path, BuildLimits())
    builder.refuse_gridsample(b, allow=True)  # insisting is accepted
    builder.refuse_gridsample(make_bundle(tmp_path, msda="plugin"), allow=False)


def test_cli_build_arguments():
    from dvis_trt.engine import cli_build
    p = argparse.ArgumentParser()
    cli_build.add_arguments(p)
    args = p.parse_args(["B", "--resolutions", "360p, 1280x720", "--max-tracks", "64",
                         "--window", "3", "--profile-mode", "range"])
    lim = cli_build.limits_from_args(args)
    assert lim == BuildLimits(window=3, max_frames=100, resolutions=("360p", "1280x720"),
                              max_tracks=64, mode="range")
    with pytest.raises(SystemExit):
        p.parse_args(["B", "--max-tracks", "0"])
