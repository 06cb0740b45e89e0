"""benchmarks/openvino_compare.py: its pure parts, and its OpenVINO stage runner against ORT on
the tiny bundle (skipped without openvino). Nothing here is timed."""
from __future__ import annotations

import numpy as np
import pytest

from dvis_trt.benchmarks.openvino_compare import output_differences, round_ratios
from dvis_trt.errors import InputError


def test_output_differences_absolute_and_relative():
    ref = {"a": np.array([[1.0, -4.0], [2.0, 0.5]], np.float32), "z": np.zeros(3, np.float32),
           "i": np.array([3, 7], np.int64)}
    got = {"a": ref["a"] + np.array([[0.0, 0.5], [-1.0, 0.0]], np.float32),
           "z": np.zeros(3, np.float32), "i": np.array([3, 5], np.int64)}
    d = output_differences(got, ref)
    assert d["a"]["max_abs"] == pytest.approx(1.0, abs=1e-7)
    assert d["a"]["max_rel"] == pytest.approx(1.0 / 4.0, abs=1e-7)   # / max |ref| = 4
    assert d["z"] == {"max_abs": 0.0, "max_rel": 0.0}
    assert d["i"]["max_abs"] == 2.0 and d["i"]["max_rel"] == pytest.approx(2 / 7, abs=1e-12)
    assert output_differences({"z": np.ones(3)}, {"z": np.zeros(3)})["z"]["max_rel"] == np.inf
    with pytest.raises(InputError, match="missing"):
        output_differences({}, {"a": ref["a"]})
    with pytest.raises(InputError, match="shape"):
        output_differences({"a": ref["a"][0]}, {"a": ref["a"]})


def test_round_ratios_per_round_then_order_statistics():
    r = round_ratios([3.0, 2.0, 9.0], [1.5, 2.0, 3.0])
    assert r["values"] == [2.0, 1.0, 3.0]
    assert (r["n"], r["min"], r["median"], r["max"]) == (3, 1.0, 2.0, 3.0)
    with pytest.raises(InputError):
        round_ratios([1.0], [1.0, 2.0])
    with pytest.raises(InputError):
        round_ratios([1.0], [0.0])


def test_openvino_stages_match_ort_on_the_tiny_bundle(tiny_bundle):
    pytest.importorskip("openvino")
    from dvis_trt.benchmarks.openvino_compare import OpenVinoStages
    from dvis_trt.runtime.backends.ort_backend import OrtBackend
    from dvis_trt.runtime.bundle import load_manifest

    m = load_manifest(tiny_bundle)
    rng = np.random.default_rng(0)
    feed = {"images": rng.standard_normal((2, 3, 64, 96)).astype(np.float32)}
    with OrtBackend(("cpu",), threads=2, graph_cache=None) as ort_b, \
            OpenVinoStages(threads=2) as ov_b:
        ort_b.load_stage("segmenter", m)
        ov_b.load_stage("segmenter", m)
        ref = ort_b.run("segmenter", feed)
        got = ov_b.run("segmenter", feed)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape
    # same fp32 graph, two runtimes: ~1e-6 relative measured; 1e-4 leaves a wide margin
    for name, d in output_differences(got, ref).items():
        assert d["max_rel"] <= 1e-4, (name, d)
