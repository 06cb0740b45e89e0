"""Shared fixtures: the tiny test checkpoint, its ONNX bundle (built once per session), the eager
oracle loaded from the same checkpoint, ONNX Runtime runners and the demo MP4.

The checkpoint is the seeded random init of ``export/configs/tiny.yaml`` with
:func:`dvis_trt.export.testing.spread_weights_` applied (class logits sharpened: class weights
x5 and a +8 "no object" bias, so foreground scores straddle the selection thresholds), seed
:data:`TINY_SEED`. On the demo scene (:func:`demo_mp4`) it makes the tracker birth tracks in
every segmenter window, keep some to the end, kill some after 8 misses, revive some after a
miss and noise-filter short ones (``tests/test_e2e_parity.py`` asserts this).

torch is imported only inside the fixtures that need it, so torch-free test files can share
this conftest.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "export" / "configs" / "tiny.yaml"
#: seed of the tiny test weights (see the module docstring for why this one)
TINY_SEED = 6
#: the demo scene the parity tests run: frames, (H, W) odd on purpose, scene seed
DEMO_FRAMES, DEMO_SIZE, DEMO_SCENE_SEED = 20, (333, 501), 0


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny spread checkpoint in the official layout (``{"model": state_dict}``)."""
    pytest.importorskip("torch")
    from dvis_trt.export.checkpoint import write_random_checkpoint
    from dvis_trt.export.testing import build_test_model
    from dvis_trt.export.config import load_config

    cfg = load_config(TINY_CONFIG)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_spread.pth"
    write_random_checkpoint(lambda: build_test_model(cfg, seed=TINY_SEED), path, TINY_SEED)
    return path


@pytest.fixture(scope="session", autouse=True)
def _ort_graph_cache(tmp_path_factory):
    """ONNX Runtime's optimized-graph cache (on by default) goes to a temporary folder, not
    the user's cache."""
    import os
    old = os.environ.get("DVIS_TRT_ORT_GRAPH_CACHE")
    os.environ["DVIS_TRT_ORT_GRAPH_CACHE"] = str(tmp_path_factory.mktemp("ort_graphs"))
    yield
    if old is None:
        os.environ.pop("DVIS_TRT_ORT_GRAPH_CACHE", None)
    else:
        os.environ["DVIS_TRT_ORT_GRAPH_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """ONNX bundle (``--msda onnx``) exported from :func:`tiny_checkpoint` (~15 s, once)."""
    from dvis_trt.export.onnx_export import export_from_checkpoint

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_from_checkpoint(TINY_CONFIG, tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_eager(tiny_checkpoint):
    """The eager oracle ``DvisDaqOffline`` built from the config and loaded (strictly) from
    :func:`tiny_checkpoint`."""
    pytest.importorskip("torch")
    from dvis_trt.export.checkpoint import load_checkpoint
    from dvis_trt.export.model.build import build_model
    from dvis_trt.export.config import load_config

    model = build_model(load_config(TINY_CONFIG))
    load_checkpoint(model, tiny_checkpoint, strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_runner(tiny_bundle):
    """``make(**kw) -> Runner`` on ONNX Runtime CPU (2 threads, quiet), cached per kwargs."""
    from dvis_trt.runtime.runner import Runner

    cache = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            opts = dict(backend="ort", providers="cpu", threads=2, quiet=True)
            opts.update(kw)
            cache[key] = Runner(tiny_bundle, opts.pop("backend"), **opts)
        return cache[key]

    yield make
    for r in cache.values():
        r.close()


@pytest.fixture(scope="session")
def demo_mp4(tmp_path_factory):
    """A real H.264 MP4 (lossless yuv444p, 333x501, 20 frames, moving textured objects):
    :class:`~dvis_trt.runtime.synthetic.DemoVideo`."""
    from dvis_trt.runtime.synthetic import make_demo_video

    path = tmp_path_factory.mktemp("video") / "demo.mp4"
    return make_demo_video(path, num_frames=DEMO_FRAMES, size=DEMO_SIZE, seed=DEMO_SCENE_SEED)


@pytest.fixture(scope="session")
def demo_frames(demo_mp4):
    """The demo MP4 decoded by our reader: list of uint8 (H, W, 3) RGB frames."""
    from dvis_trt.runtime.video import open_source

    return [f.rgb for f in open_source(demo_mp4.path).iter_frames()]
