"""``--msda plugin`` / ``--msda trt-builtin`` exports: graph contract, checker, ORT parity
through the MSDA CPU twin (skipped, with the reason, when the twin cannot be loaded or built).

Tolerance of the parity test: as ``tests/test_export.py`` (``max-abs <= 1e-5 + 1e-4 *
max|ref|``): the twin computes the reference bilinear sampling in fp32 in another summation
order (~1e-7 per call), the rest of the graph is the ``onnx`` mode's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dvis_trt.export.model import msda as msda_mod
from dvis_trt.export.model.build import build_model
from dvis_trt.export.onnx_checks import check_graph
from dvis_trt.export.onnx_export import export_bundle
from dvis_trt.export.stages import build_stages, run_stage_eager
from dvis_trt.runtime.backends.ort_backend import OrtBackend
from dvis_trt.export.config import load_config
from dvis_trt.errors import BundleError, DependencyError
from dvis_trt.runtime.bundle import STAGE_NAMES, load_manifest

TINY = Path(__file__).resolve().parents[1] / "export" / "configs" / "tiny.yaml"
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def model_cfg():
    cfg = load_config(TINY)
    torch.manual_seed(0)
    return build_model(cfg), cfg


@pytest.fixture(scope="module")
def plugin_bundle(model_cfg, tmp_path_factory):
    model, cfg = model_cfg
    out = tmp_path_factory.mktemp("plugin") / "bundle"
    return export_bundle(model, cfg, out, msda="plugin", window=2, example_size=(64, 96))


def _custom_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.domain not in ("", "ai.onnx")]


def test_plugin_graph_contract(plugin_bundle, model_cfg):
    man = plugin_bundle
    model, _ = model_cfg
    assert man.msda == "plugin"
    assert man.producer["msda_node"] == {"domain": "dvis_trt", "op_type": "DvisMSDeformAttn",
                                         "plugin_version": "1"}
    seg = man.stage_path("segmenter")
    onnx.checker.check_model(str(seg), full_check=True)
    nodes = _custom_nodes(seg)
    # one node per attention call: one per encoder layer of the pixel decoder
    n_layers = len(model.sem_seg_head.pixel_decoder.transformer.encoder.layers)
    assert len(nodes) == n_layers >= 1
    for n in nodes:
        assert (n.domain, n.op_type) == ("dvis_trt", "DvisMSDeformAttn")
        attrs = {a.name: a.s.decode() for a in n.attribute}
        assert attrs == {"plugin_version": "1", "plugin_namespace": ""}
        assert len(n.input) == 5 and len(n.output) == 1
    seg_model = onnx.load(str(seg))
    assert "GridSample" not in {n.op_type for n in seg_model.graph.node}
    assert {o.domain: o.version for o in seg_model.opset_import}.get("dvis_trt") == 1
    spec = man.stages["segmenter"]
    check_graph(seg_model, "segmenter", spec.inputs, spec.outputs, "plugin")
    for s in STAGE_NAMES[1:]:
        assert not _custom_nodes(man.stage_path(s))


def test_trt_builtin_graph_and_ort_refuses_it(model_cfg, tmp_path):
    model, cfg = model_cfg
    man = export_bundle(model, cfg, tmp_path / "b", msda="trt-builtin", window=1,
                        example_size=(64, 64), stages=["segmenter"])
    nodes = _custom_nodes(man.stage_path("segmenter"))
    assert nodes and all(n.op_type == "MultiscaleDeformableAttnPlugin_TRT" for n in nodes)
    attrs = {a.name: a.s.decode() for a in nodes[0].attribute}
    assert attrs["plugin_version"] == msda_mod.TRT_BUILTIN_VERSION
    assert attrs["plugin_namespace"] == ""
    onnx.checker.check_model(str(man.stage_path("segmenter")), full_check=True)
    with pytest.raises(BundleError, match="trt-builtin"):
        OrtBackend("cpu").load_stage("segmenter", man)


def _twin_or_skip():
    try:
        from dvis_trt.plugins.ort_op import register_ort_op
        register_ort_op()
    except (ImportError, DependencyError) as exc:
        pytest.skip(f"MSDA CPU twin for ONNX Runtime not available: {str(exc).splitlines()[0]}")


@pytest.mark.parametrize("frames,height,width", [(1, 64, 96), (2, 96, 64)])
def test_plugin_bundle_runs_in_ort_with_parity(plugin_bundle, model_cfg, frames, height, width):
    _twin_or_skip()
    model, _ = model_cfg
    backend = OrtBackend("cpu", threads=2)
    backend.load_stage("segmenter", plugin_bundle)
    rng = np.random.default_rng(frames)
    images = rng.standard_normal((frames, 3, height, width), dtype=np.float32)
    ref = run_stage_eager(build_stages(model)["segmenter"], "segmenter", {"images": images})
    got = backend.run("segmenter", {"images": images})
    for name, r in ref.items():
        assert got[name].shape == r.shape
        err = float(np.abs(got[name] - r).max())
        assert err <= ATOL + RTOL * float(np.abs(r).max()), (name, err)


def test_plugin_bundle_without_twin_is_a_dependency_error(plugin_bundle, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "dvis_trt.plugins.ort_op", None)  # import fails
    with pytest.raises(DependencyError, match="--msda plugin"):
        OrtBackend("cpu").load_stage("segmenter", load_manifest(plugin_bundle.root))
