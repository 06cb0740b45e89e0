"""The MSDeformAttn CPU twin (plugins/src/msda_cpu.cpp over include/dvis_msda/msda_math.h, the math the CUDA
kernel runs) against independent references, and its ONNX Runtime custom op.

References, both written here from the definition, not from the code under test:
- ``_loop_reference``: plain Python loops in float64 over every (n, q, m, l, p) and the four bilinear corners;
  uses level_start_index (as the CUDA kernel does).
- ``_torch_reference``: grid_sample on ``2*loc - 1`` per level (how the official ``ms_deform_attn_core_pytorch``
  computes), in float64.

Tolerance: the twin accumulates in float32 over at most L*P*4 = 64 taps per output with |value| ~ N(0,1) and
weights <= 1; the rounding error is a few 1e-7 of the output scale, so 1e-5 * max|ref| + 1e-6 is a safe bound
that still catches any wrong tap, weight or index (those move outputs by O(1)).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from dvis_trt.plugins import build, library_filename

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / "build" / "plugins"
# One CUDA arch keeps CI's compile short; test_plugin_build.py uses the same configuration (no reconfigure).
CUDA_ARCHS = os.environ.get("DVIS_TEST_CUDA_ARCHS", "90")


@pytest.fixture(scope="module")
def cpu_lib():
    """Build (incrementally, cached in build/plugins) and load the CPU twin."""
    res = build(BUILD_DIR, cuda_archs=CUDA_ARCHS, targets=["dvis_msda_cpu"])
    path = res.build_dir / library_filename("cpu")
    assert path.is_file(), res.log[-2000:]
    from dvis_trt.plugins.cpu_twin import load_cpu_library

    load_cpu_library(path)
    return path


def _fwd(*args, **kw):
    from dvis_trt.plugins.cpu_twin import msda_forward_cpu

    return msda_forward_cpu(*args, **kw)


def _loop_reference(value, shapes, starts, loc, attn):
    """Direct float64 loops: bilinear, zero padding, align_corners=False (pixel centres at integers)."""
    value = value.astype(np.float64)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = np.zeros((N, Lq, M, D))
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for lvl in range(L):
                    h, w = int(shapes[lvl][0]), int(shapes[lvl][1])
                    s0 = int(starts[lvl])
                    for p in range(P):
                        x = float(loc[n, q, m, lvl, p, 0]) * w - 0.5
                        y = float(loc[n, q, m, lvl, p, 1]) * h - 0.5
                        if math.isnan(x) or math.isnan(y):
                            continue
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    out[n, q, m] += attn[n, q, m, lvl, p] * wy * wx * value[n, s0 + yy * w + xx, m]
    return out.reshape(N, Lq, M * D)


def _torch_reference(value, shapes, loc, attn):
    """grid_sample per level on the grid 2*loc-1, float64 (official ms_deform_attn_core_pytorch's recipe)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    v = torch.from_numpy(value).double()
    lc = torch.from_numpy(loc).double()
    at = torch.from_numpy(attn).double()
    N, S, M, D = v.shape
    _, Lq, _, L, P, _ = lc.shape
    sizes = [int(h) * int(w) for h, w in shapes]
    levels = v.split(sizes, dim=1)
    grid = 2 * lc - 1
    cols = []
    for lvl, (h, w) in enumerate(shapes):
        img = levels[lvl].permute(0, 2, 3, 1).reshape(N * M, D, int(h), int(w))
        g = grid[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(N * M, Lq, P, 2)
        cols.append(F.grid_sample(img, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(cols, dim=-2).reshape(N * M, D, Lq, L * P)
    wts = at.permute(0, 2, 1, 3, 4).reshape(N * M, 1, Lq, L * P)
    out = (sampled * wts).sum(-1).reshape(N, M * D, Lq).permute(0, 2, 1)
    return out.numpy()


def _starts(shapes):
    return np.cumsum([0] + [int(h) * int(w) for h, w in shapes])[:-1].astype(np.int64)


def _border_locations(rng, shapes, shape):
    """Locations mixing random points (many outside [0,1]) with exact border cases of each level."""
    loc = rng.uniform(-0.3, 1.3, size=shape).astype(np.float32)
    N, Lq, M, L, P, _ = shape
    for lvl, (h, w) in enumerate(shapes):
        # x = -1, -0.5, 0, w-1, w-0.5, w (pixel units) and pixel centres, as normalised locations
        special_x = np.array([-0.5 / w, 0.0, 0.5 / w, (w - 0.5) / w, 1.0, (w + 0.5) / w], dtype=np.float32)
        special_y = np.array([-0.5 / h, 0.0, 0.5 / h, (h - 0.5) / h, 1.0, (h + 0.5) / h], dtype=np.float32)
        mask = rng.random((N, Lq, M, P)) < 0.4
        loc[..., lvl, :, 0] = np.where(mask, rng.choice(special_x, size=mask.shape), loc[..., lvl, :, 0])
        mask = rng.random((N, Lq, M, P)) < 0.4
        loc[..., lvl, :, 1] = np.where(mask, rng.choice(special_y, size=mask.shape), loc[..., lvl, :, 1])
    return loc


def _case(seed, L, P, D, N, M=2, Lq=7):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, 9)), int(rng.integers(1, 9))) for _ in range(L)]
    if L > 1:
        shapes[0] = (5, 8)  # at least one clearly non-square level
    S = sum(h * w for h, w in shapes)
    value = rng.standard_normal((N, S, M, D)).astype(np.float32)
    loc = _border_locations(rng, shapes, (N, Lq, M, L, P, 2))
    attn = rng.random((N, Lq, M, L, P)).astype(np.float32)
    return value, np.array(shapes, dtype=np.int64), _starts(shapes), loc, attn


def _assert_close(out, ref):
    tol = 1e-5 * float(np.abs(ref).max()) + 1e-6
    err = float(np.abs(out.astype(np.float64) - ref).max())
    assert err <= tol, f"max |twin - reference| = {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("seed,L,P,D,N", [
    (0, 3, 4, 32, 2), (1, 1, 1, 64, 3), (2, 4, 4, 64, 1), (3, 2, 1, 32, 2), (4, 3, 4, 64, 2), (5, 2, 4, 32, 3),
])
def test_twin_matches_grid_sample_reference(cpu_lib, seed, L, P, D, N):
    value, shapes, starts, loc, attn = _case(seed, L, P, D, N)
    out = _fwd(value, shapes, starts, loc, attn)
    assert out.shape == (N, loc.shape[1], value.shape[2] * D) and out.dtype == np.float32
    _assert_close(out, _torch_reference(value, shapes, loc, attn))


@pytest.mark.parametrize("grid", [(6, 10), (10, 6)])
def test_twin_vit_adapter_extractor_shapes(cpu_lib, grid):
    """The ViT-Adapter-L extractor's call: 16 heads x 64 channels, 1 level, 4 points; values on
    the ViT grid (stride 16), queries = the spatial-prior tokens of strides 8/16/32 (Lq = 21/4 S,
    more queries than values, reference points of other strides), landscape and portrait."""
    h, w = grid
    rng = np.random.default_rng(h * 100 + w)
    shapes = np.array([(h, w)], dtype=np.int64)
    lq = 4 * h * w + h * w + (h // 2) * (w // 2)
    value = rng.standard_normal((2, h * w, 16, 64)).astype(np.float32)
    loc = _border_locations(rng, [(h, w)], (2, lq, 16, 1, 4, 2))
    attn = rng.random((2, lq, 16, 1, 4)).astype(np.float32)
    out = _fwd(value, shapes, _starts(shapes), loc, attn)
    assert out.shape == (2, lq, 16 * 64)
    _assert_close(out, _torch_reference(value, shapes, loc, attn))


@pytest.mark.parametrize("seed,D", [(10, 5), (11, 13), (12, 8)])
def test_twin_matches_loop_reference_odd_head_dims(cpu_lib, seed, D):
    # D not a multiple of 8 exercises the single-channel remainder path of the shared accumulation.
    value, shapes, starts, loc, attn = _case(seed, L=3, P=2, D=D, N=2, Lq=5)
    _assert_close(_fwd(value, shapes, starts, loc, attn), _loop_reference(value, shapes, starts, loc, attn))


def test_exact_borders_power_of_two_maps(cpu_lib):
    # Maps of 4x8 and 2x2: every special location below is exact in binary, so taps land exactly on pixel
    # centres / borders. Hand-checked expectations on a one-channel ramp.
    shapes = np.array([[4, 8], [2, 2]], dtype=np.int64)
    starts = _starts(shapes)
    S = 4 * 8 + 2 * 2
    value = np.arange(S, dtype=np.float32).reshape(1, S, 1, 1) + 1.0  # level 0: 1..32, level 1: 33..36
    xs = [-1 / 16, 0.0, 1 / 16, 15 / 16, 1.0, 17 / 16, 3 / 16]
    loc = np.zeros((1, len(xs), 1, 2, 1, 2), dtype=np.float32)
    loc[0, :, 0, 0, 0, 0] = xs          # x on level 0 (w=8): pixel x = -1, -0.5, 0, 7, 7.5, 8, 1
    loc[0, :, 0, 0, 0, 1] = 1 / 8       # y on level 0 (h=4): pixel y = 0 (first row)
    loc[0, :, 0, 1, 0, :] = 0.25        # level 1 (2x2): pixel (0, 0) exactly -> value 33
    attn = np.ones((1, len(xs), 1, 2, 1), dtype=np.float32)
    attn[..., 1, :] = 0.5
    out = _fwd(value, shapes, starts, loc, attn)[0, :, 0]
    # level 0 row 0 holds 1..8 at x = 0..7; zero padding outside.
    expect0 = np.array([0.0, 0.5 * 1, 1.0, 8.0, 0.5 * 8, 0.0, 2.0])
    np.testing.assert_allclose(out, expect0 + 0.5 * 33, rtol=0, atol=1e-6)
    _assert_close(out[None, :, None], _loop_reference(value, shapes, starts, loc, attn))


def test_level_start_index_is_honoured(cpu_lib):
    # Levels stored out of order with a gap in S: the twin must read rows from level_start_index (as the CUDA
    # kernel and TensorRT's plugin do), not assume the levels are packed in order.
    rng = np.random.default_rng(20)
    shapes = np.array([[3, 4], [2, 5]], dtype=np.int64)
    starts = np.array([13, 0], dtype=np.int64)  # level 1 first, 3 unused rows in between
    value = rng.standard_normal((2, 25, 2, 8)).astype(np.float32)
    loc = rng.uniform(-0.2, 1.2, (2, 6, 2, 2, 3, 2)).astype(np.float32)
    attn = rng.random((2, 6, 2, 2, 3)).astype(np.float32)
    _assert_close(_fwd(value, shapes, starts, loc, attn), _loop_reference(value, shapes, starts, loc, attn))


def test_int32_indices_threads_and_out(cpu_lib):
    value, shapes, starts, loc, attn = _case(30, L=3, P=4, D=32, N=3, Lq=40)
    ref = _fwd(value, shapes, starts, loc, attn, num_threads=1)
    np.testing.assert_array_equal(_fwd(value, shapes.astype(np.int32), starts.astype(np.int32), loc, attn), ref)
    np.testing.assert_array_equal(_fwd(value, shapes, starts, loc, attn, num_threads=3), ref)
    buf = np.full(ref.shape, np.nan, dtype=np.float32)
    assert _fwd(value, shapes, starts, loc, attn, out=buf) is buf
    np.testing.assert_array_equal(buf, ref)


def test_nan_and_far_locations_contribute_zero(cpu_lib):
    # Like the official CUDA kernel: a point outside (-1, w) x (-1, h) (or NaN) adds nothing.
    shapes = np.array([[3, 3]], dtype=np.int64)
    value = np.ones((1, 9, 1, 4), dtype=np.float32)
    loc = np.array([np.nan, 0.5, 1e30, 0.5, -1e30, 0.5, 0.5, 0.5], dtype=np.float32).reshape(1, 1, 1, 1, 4, 2)
    attn = np.ones((1, 1, 1, 1, 4), dtype=np.float32)
    np.testing.assert_allclose(_fwd(value, shapes, np.array([0]), loc, attn), np.ones((1, 1, 4)), atol=1e-6)


def test_bad_inputs_raise_one_clear_error(cpu_lib):
    value, shapes, starts, loc, attn = _case(40, L=2, P=2, D=8, N=1)
    with pytest.raises(ValueError, match="level 1"):
        _fwd(value, shapes, starts + np.array([0, 5]), loc, attn)  # level 1 runs past S
    with pytest.raises(ValueError, match="attention_weights"):
        _fwd(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(ValueError, match="sampling_locations"):
        _fwd(value, shapes, starts, loc[:, :, :1], attn)
    with pytest.raises(ValueError, match="integer"):
        _fwd(value, shapes.astype(np.float32), starts, loc, attn)
    with pytest.raises(ValueError, match="level_start_index"):
        _fwd(value, shapes, starts[:1], loc, attn)
    with pytest.raises(ValueError, match="4-D"):
        _fwd(value[0], shapes, starts, loc, attn)


def test_matches_project_reference_when_available(cpu_lib):
    msda = pytest.importorskip("dvis_trt.export.model.msda")
    torch = pytest.importorskip("torch")
    value, shapes, starts, loc, attn = _case(50, L=3, P=4, D=32, N=2, Lq=9)
    ref = msda.ms_deform_attn_core_pytorch(torch.from_numpy(value).double(), shapes.tolist(),
                                           torch.from_numpy(loc).double(), torch.from_numpy(attn).double())
    _assert_close(_fwd(value, shapes, starts, loc, attn), ref.numpy())


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------
def _node_model(index_type, M, D, L, P, with_relu=True):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    it = {np.int64: TensorProto.INT64, np.int32: TensorProto.INT32}[index_type]
    node = helper.make_node("DvisMSDeformAttn", ["value", "ss", "lsi", "loc", "attn"], ["msda"], domain="dvis_trt",
                            plugin_version="1", plugin_namespace="")
    # a regular op after the node checks that the output flows on through the graph
    nodes = [node, helper.make_node("Relu" if with_relu else "Identity", ["msda"], ["out"])]
    g = helper.make_graph(nodes, "msda", [
        helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N", "S", M, D]),
        helper.make_tensor_value_info("ss", it, [L, 2]),
        helper.make_tensor_value_info("lsi", it, [L]),
        helper.make_tensor_value_info("loc", TensorProto.FLOAT, ["N", "Lq", M, L, P, 2]),
        helper.make_tensor_value_info("attn", TensorProto.FLOAT, ["N", "Lq", M, L, P]),
    ], [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "Lq", M * D])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("dvis_trt", 1)])


@pytest.mark.parametrize("index_type", [np.int64, np.int32])
def test_onnxruntime_runs_the_node(cpu_lib, index_type):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime_extensions")
    from dvis_trt.plugins.ort_op import session_options, uses_msda_plugin

    value, shapes, starts, loc, attn = _case(60, L=3, P=4, D=32, N=2, Lq=11)
    model = _node_model(index_type, M=2, D=32, L=3, P=4)
    assert uses_msda_plugin(model)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    feeds = {"value": value, "ss": shapes.astype(index_type), "lsi": starts.astype(index_type), "loc": loc,
             "attn": attn}
    out = sess.run(None, feeds)[0]
    _assert_close(out, np.maximum(_torch_reference(value, shapes, loc, attn), 0.0))


def test_onnxruntime_large_output_is_copied_intact(cpu_lib):
    # ~1M outputs: exercises the array hand-over to onnxruntime-extensions (no Python list) end to end.
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime_extensions")
    from dvis_trt.plugins.ort_op import session_options

    rng = np.random.default_rng(70)
    shapes = np.array([[32, 48], [16, 24], [8, 12]], dtype=np.int64)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    N, M, D, L, P = 2, 8, 32, 3, 4
    value = rng.standard_normal((N, S, M, D)).astype(np.float32)
    loc = rng.random((N, S, M, L, P, 2)).astype(np.float32)
    attn = rng.random((N, S, M, L, P)).astype(np.float32)
    sess = ort.InferenceSession(_node_model(np.int64, M, D, L, P, with_relu=False).SerializeToString(),
                                session_options(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"value": value, "ss": shapes, "lsi": _starts(shapes), "loc": loc, "attn": attn})[0]
    np.testing.assert_array_equal(out, _fwd(value, shapes, _starts(shapes), loc, attn))


def test_plugin_export_runs_in_onnxruntime_with_onnx_parity(cpu_lib, tmp_path):
    """A --msda plugin export of the MSDeformAttn layer runs in ONNX Runtime through the twin, as close to eager
    as the --msda onnx export (both float32; 1e-5 of the output scale, see the module docstring)."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime_extensions")
    msda = pytest.importorskip("dvis_trt.export.model.msda")
    from dvis_trt.plugins.ort_op import session_options, uses_msda_plugin

    torch.manual_seed(0)
    layer = msda.MSDeformAttn(d_model=64, n_levels=3, n_heads=2, n_points=4).eval()
    with torch.no_grad():  # spread the sampling points well beyond the default init (outside the map, too)
        layer.sampling_offsets.weight.normal_(0, 0.5)
        layer.attention_weights.weight.normal_(0, 0.5)
    shapes = torch.tensor([[6, 10], [3, 5], [2, 3]])
    starts = torch.tensor([0, 60, 75])
    src = torch.randn(2, 81, 64)
    ref_pts = torch.rand(2, 81, 3, 2)
    args = (src, ref_pts, src, shapes, starts)
    with torch.no_grad():
        eager = layer(*args).numpy()
    names = ["query", "ref", "src", "ss", "lsi"]
    errors = {}
    for mode in ("onnx", "plugin"):
        path = tmp_path / f"msda_{mode}.onnx"
        with msda.msda_mode(mode), torch.no_grad():
            torch.onnx.export(layer, args, str(path), opset_version=17, dynamo=False, input_names=names,
                              output_names=["out"],
                              custom_opsets=msda.MSDA_CUSTOM_OPSETS if mode == "plugin" else None,
                              dynamic_axes={"query": {0: "N", 1: "Lq"}, "ref": {0: "N", 1: "Lq"},
                                            "src": {0: "N", 1: "S"}, "out": {0: "N", 1: "Lq"}})
        assert uses_msda_plugin(path) == (mode == "plugin")
        so = session_options() if mode == "plugin" else ort.SessionOptions()
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = dict(zip(names, (a.numpy() for a in args)))
        out = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
        errors[mode] = float(np.abs(out - eager).max())
    tol = 1e-5 * float(np.abs(eager).max())
    assert errors["plugin"] <= tol and errors["onnx"] <= tol, errors
