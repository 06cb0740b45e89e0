"""The ONNX Runtime backend (``runtime/backends/ort_backend.py``) and the torch backend.

A bundle of the tiny config's four cheap stages (no segmenter: the backend code is the same
for every stage) is exported once. Results are checked against direct numpy formulas /
the eager modules; every bad input must give one clear ``InputError`` / ``BundleError``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dvis_trt.export.model.build import build_model
from dvis_trt.export.onnx_export import export_bundle
from dvis_trt.export.sample_inputs import SampleDims
from dvis_trt.runtime.backends.ort_backend import OrtBackend, resolve_providers
from dvis_trt.runtime.backends.torch_backend import TorchBackend
from dvis_trt.export.config import load_config
from dvis_trt.errors import BundleError, DependencyError, InputError
from dvis_trt.runtime.bundle import load_manifest, write_manifest

TINY = Path(__file__).resolve().parents[1] / "export" / "configs" / "tiny.yaml"
STAGES = ["tracker_first", "tracker_step", "refiner", "mask_head"]
C, K1, N = 32, 26, 20   # tiny config: hidden 32, 25 classes + 1, 20 new-instance queries


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    out = tmp_path_factory.mktemp("ort") / "bundle"
    man = export_bundle(model, cfg, out, window=1, example_size=(64, 64), stages=STAGES)
    return man, model


@pytest.fixture()
def backend(bundle):
    b = OrtBackend("cpu", threads=1)
    b.load_all(bundle[0])
    yield b
    b.close()


def _step_inputs(tq=3, h=8, w=12, seed=0):
    g = np.random.default_rng(seed)
    f = lambda *s: g.standard_normal(s, dtype=np.float32)  # noqa: E731
    return {"track_queries": f(tq, C), "track_pos": f(tq, C), "frame_embeds": f(N, C),
            "mask_pooled": f(N, C), "mask_features": f(C, h, w),
            "slot_index": g.integers(0, N, tq + 5).astype(np.int64)}


def test_mask_head_equals_einsum(backend):
    g = np.random.default_rng(1)
    emb = g.standard_normal((3, 4, C), dtype=np.float32)
    feats = g.standard_normal((3, C, 5, 7), dtype=np.float32)
    got = backend.run("mask_head", {"mask_embed": emb, "mask_features": feats})["pred_masks"]
    want = np.einsum("tqc,tchw->qthw", emb.astype(np.float64), feats.astype(np.float64))
    assert got.dtype == np.float32 and got.shape == (4, 3, 5, 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ort_matches_torch_backend(bundle, backend):
    """Same stage, two backends: tolerance as tests/test_export.py (1e-5 + 1e-4 * scale)."""
    man, model = bundle
    tb = TorchBackend(model)
    tb.load_all(man)
    for tq in (0, 2):
        feed = _step_inputs(tq)
        a, b = backend.run("tracker_step", feed), tb.run("tracker_step", feed)
        assert sorted(a) == sorted(b) == sorted(t.name for t in man.stages["tracker_step"].outputs)
        for k in a:
            assert a[k].shape == b[k].shape
            if b[k].size:
                assert np.abs(a[k] - b[k]).max() <= 1e-5 + 1e-4 * np.abs(b[k]).max(), k
    assert tb.loaded_stages == tuple(STAGES)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.pop("slot_index"), "missing"),
    (lambda d: d.update(extra=np.zeros(1, np.float32)), "unexpected"),
    (lambda d: d.update(frame_embeds=d["frame_embeds"].astype(np.float64)), "dtype"),
    (lambda d: d.update(slot_index=d["slot_index"].astype(np.int32)), "dtype"),
    (lambda d: d.update(frame_embeds=d["frame_embeds"][:, :16]), "dim 1"),
    (lambda d: d.update(track_pos=d["track_pos"][:2]), "symbol tQ"),
    (lambda d: d.update(mask_features=d["mask_features"][0]), "rank"),
    (lambda d: d.update(slot_index=d["slot_index"][:-1]), "ONNX Runtime"),
])
def test_bad_inputs_raise_input_error(backend, mutate, match):
    feed = _step_inputs()
    mutate(feed)
    with pytest.raises(InputError, match=match) as info:
        backend.run("tracker_step", feed)
    assert "\n" not in str(info.value)


def test_outputs_are_owned_by_the_caller(backend):
    a = backend.run("tracker_step", _step_inputs(seed=0))
    keep = {k: v.copy() for k, v in a.items()}
    backend.run("tracker_step", _step_inputs(seed=5))
    for k in a:
        np.testing.assert_array_equal(a[k], keep[k])
    # resident API on a host backend: handles are numpy arrays
    r = backend.run_resident("tracker_step", _step_inputs(), fetch=("embeds",))
    assert isinstance(r["embeds"], np.ndarray) and r["embeds"].shape == (3 + N, C)


def test_stage_errors(bundle, tmp_path):
    man, _ = bundle
    b = OrtBackend("cpu")
    with pytest.raises(BundleError, match="not loaded"):
        b.run("refiner", {})
    with pytest.raises(BundleError, match="no stage 'segmenter'"):
        b.load_stage("segmenter", man)
    b.load_stage("refiner", man)
    b.load_stage("refiner", man)                      # idempotent
    assert b.loaded_stages == ("refiner",)
    # unreadable ONNX file: one line, BundleError
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(man.root, broken)
    (broken / "mask_head.onnx").write_bytes(b"not an onnx file")
    bm = load_manifest(broken, verify=False, require_stages=None)
    with pytest.raises(BundleError, match="cannot load"):
        OrtBackend("cpu").load_stage("mask_head", bm)
    (broken / "mask_head.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        OrtBackend("cpu").load_stage("mask_head", bm)


def test_trt_builtin_bundle_is_refused(bundle, tmp_path):
    import dataclasses
    import shutil
    man, _ = bundle
    copy = tmp_path / "tb"
    shutil.copytree(man.root, copy)
    m = load_manifest(copy, require_stages=None)
    write_manifest(copy, dataclasses.replace(m, msda="trt-builtin"))
    with pytest.raises(BundleError, match="trt-builtin"):
        OrtBackend("cpu").load_stage("refiner", load_manifest(copy, require_stages=None))


def test_providers():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    auto = resolve_providers("auto")
    assert auto[-1] == "CPUExecutionProvider"
    with pytest.raises(InputError, match="unknown"):
        resolve_providers("bogus")
    import onnxruntime as ort
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DependencyError, match="not available"):
            resolve_providers("tensorrt,cpu")
    with pytest.raises(InputError, match="threads"):
        OrtBackend("cpu", threads=0)
    with pytest.raises(InputError, match="optimization"):
        OrtBackend("cpu", optimization="max")


def test_torch_backend_needs_checkpoint_without_model(bundle):
    man, _ = bundle
    with pytest.raises(InputError, match="checkpoint"):
        TorchBackend().load_stage("refiner", man)


def test_ort_backend_runs_without_torch(bundle):
    """The runtime side imports and runs with torch unavailable (edge installs)."""
    man, _ = bundle
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from dvis_trt.runtime.bundle import load_manifest\n"
        "from dvis_trt.runtime.backends.ort_backend import OrtBackend\n"
        f"m = load_manifest({str(man.root)!r}, require_stages=None)\n"
        "b = OrtBackend('cpu'); b.load_stage('mask_head', m)\n"
        "out = b.run('mask_head', {'mask_embed': np.ones((1, 2, 32), np.float32),\n"
        "                          'mask_features': np.ones((1, 32, 3, 4), np.float32)})\n"
        "assert out['pred_masks'].shape == (2, 1, 3, 4) and (out['pred_masks'] == 32).all()\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_sample_dims_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        SampleDims(height=70).check()
    with pytest.raises(ValueError, match="tracks"):
        SampleDims(tracks=-1).check()


def test_per_frame_shape_stage_runs_without_arena(backend):
    """tracker_step's tQ changes every frame: its session has ORT's memory pattern and CPU
    arena off (each would keep the peak of every shape seen); fixed-shape stages keep both."""
    step = backend._sessions["tracker_step"].get_session_options()
    assert not step.enable_mem_pattern and not step.enable_cpu_mem_arena
    first = backend._sessions["tracker_first"].get_session_options()
    assert first.enable_mem_pattern and first.enable_cpu_mem_arena
    # results do not depend on it: a second shape after the first still runs and is finite
    for tq in (3, 7, 3):
        out = backend.run("tracker_step", _step_inputs(tq=tq))
        assert all(np.isfinite(v).all() for v in out.values())
