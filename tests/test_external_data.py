"""ONNX external data for large stage graphs (ViT-L's ~1.3 GB segmenter).

The threshold is lowered so the tiny model's ``tracker_first`` graph (the quickest stage with
weights to export) goes external: the graph and its
``segmenter.onnx.data`` are both in the manifest with their own sha256, ONNX Runtime runs the
bundle, the integrity check catches a modified or missing data file, a re-export replaces the
pair, and a reduced-precision export that fits in one file leaves no stale data file behind.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from dvis_trt.export import onnx_export, onnx_io  # noqa: E402
from dvis_trt.export.model.build import build_model  # noqa: E402
from dvis_trt.export.stages import build_stages, run_stage_eager  # noqa: E402
from dvis_trt.runtime.backends.ort_backend import OrtBackend  # noqa: E402
from dvis_trt.export.config import load_config  # noqa: E402
from dvis_trt.errors import BundleError  # noqa: E402
from dvis_trt.runtime.bundle import load_manifest  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "export" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def model_cfg():
    cfg = load_config(TINY)
    torch.manual_seed(0)
    return build_model(cfg), cfg


STAGE = "tracker_first"


def _export(model_cfg, out, **kw):
    model, cfg = model_cfg
    return onnx_export.export_bundle(model, cfg, out, window=1, example_size=(64, 96),
                                     stages=[STAGE, "mask_head"], **kw)


@pytest.fixture(scope="module")
def bundle(model_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("ext") / "b"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 50_000)
        man = _export(model_cfg, root)
    return root, man


def test_large_graph_goes_external_and_is_hashed(model_cfg, bundle):
    root, man = bundle
    seg = man.stages[STAGE]
    assert seg.data_file == f"{STAGE}.onnx.data"
    assert man.stages["mask_head"].data_file is None  # small graphs stay one file
    assert (root / seg.data_file).stat().st_size > (root / seg.file).stat().st_size
    entry = json.loads((root / "manifest.json").read_text())["stages"][STAGE]
    assert entry["external_data"]["file"] == f"{STAGE}.onnx.data"
    assert len(entry["external_data"]["sha256"]) == 64
    assert onnx_io.external_data_file(root / seg.file) == seg.data_file
    # the graph carries references, not weights; the checker follows them
    g = onnx.load(str(root / seg.file), load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in g.graph.initializer)
    onnx.checker.check_model(str(root / seg.file), full_check=True)
    # ONNX Runtime finds the data next to the graph: same numbers as eager
    model, _ = model_cfg
    backend = OrtBackend("cpu", threads=2)
    backend.load_stage(STAGE, load_manifest(root, require_stages=None))
    rng = np.random.default_rng(0)
    q, c = 20, 32  # tiny.yaml: 20 queries, hidden 32, mask dim 32
    inputs = {"frame_embeds": rng.standard_normal((q, c), dtype=np.float32),
              "mask_features": rng.standard_normal((32, 16, 24), dtype=np.float32)}
    ref = run_stage_eager(build_stages(model)[STAGE], STAGE, inputs)
    got = backend.run(STAGE, inputs)
    for name, r in ref.items():
        assert float(np.abs(got[name] - r).max()) <= 1e-5 + 1e-4 * float(np.abs(r).max())


def test_integrity_check_covers_the_data_file(bundle, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(bundle[0], root)
    data = root / bundle[1].stages[STAGE].data_file
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="external data.*sha256"):
        load_manifest(root, require_stages=None)
    data.unlink()
    with pytest.raises(BundleError, match="external data.*missing"):
        load_manifest(root, require_stages=None)


@pytest.mark.slow
def test_reexport_replaces_the_pair_and_fp16_leaves_no_stale_data(model_cfg, bundle, tmp_path,
                                                                  monkeypatch):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(bundle[0], root)
    # at fp16 the same graph is about half the size: below a threshold between the two sizes
    fp32_bytes = sum(p.stat().st_size for p in root.glob(f"{STAGE}.onnx*"))
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", int(fp32_bytes * 0.7))
    man = _export(model_cfg, root, precision="fp16")
    assert man.stages[STAGE].data_file is None
    assert not (root / f"{STAGE}.onnx.data").exists()
    load_manifest(root, require_stages=None)  # hashes verified
