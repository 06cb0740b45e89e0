"""Multi-scale deformable attention (``export/model/msda.py``).

The independent reference is :func:`np_ms_deform_attn`, a float64 per-sample loop that follows
the official CUDA kernel (``ms_deform_attn_im2col_bilinear``): pixel coordinates
``loc * size - 0.5``, the sample is taken only when it lies in ``(-1, size)`` on both axes, and
each of its four neighbours contributes only when it is inside the map. It shares no code with
``grid_sample``.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dvis_trt.export.model import msda
from dvis_trt.export.model.msda import (
    MSDA_CUSTOM_OPSETS,
    MSDeformAttn,
    get_msda_mode,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    msda_mode,
)


# ----------------------------------------------------------------------------- reference
def np_ms_deform_attn(value, shapes, locations, weights):
    """value (N,S,M,D), shapes [(H,W)], locations (N,Lq,M,L,P,2) (x,y), weights (N,Lq,M,L,P)
    -> (N,Lq,M*D) float64, one bilinear sample at a time."""
    value = np.asarray(value, np.float64)
    locations = np.asarray(locations, np.float64)
    weights = np.asarray(weights, np.float64)
    n_, _, m_, d_ = value.shape
    _, lq_, _, l_, p_, _ = locations.shape
    starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])[:-1]]).astype(int)
    out = np.zeros((n_, lq_, m_, d_))
    for n in range(n_):
        for q in range(lq_):
            for m in range(m_):
                for lvl in range(l_):
                    h, w = shapes[lvl]
                    for p in range(p_):
                        x = locations[n, q, m, lvl, p, 0] * w - 0.5
                        y = locations[n, q, m, lvl, p, 1] * h - 0.5
                        if not (y > -1 and x > -1 and y < h and x < w):
                            continue
                        y0, x0 = math.floor(y), math.floor(x)
                        ly, lx = y - y0, x - x0
                        acc = np.zeros(d_)
                        for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
                            for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    acc += wy * wx * value[n, starts[lvl] + yy * w + xx, m]
                        out[n, q, m] += weights[n, q, m, lvl, p] * acc
    return out.reshape(n_, lq_, m_ * d_)


SHAPES = [(5, 7), (3, 4), (2, 1)]  # non-square, one level a single column


def make_inputs(shapes, n=2, lq=7, m=2, d=32, p=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    n_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, n_levels, p, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    # special points per level: borders, pixel centres, exactly where the kernel's window
    # ends (x*W - 0.5 = -1 or = W), and far outside
    for lvl, (h, w) in enumerate(shapes):
        xs = [0.0, 1.0, 0.5 / w, (w - 0.5) / w, -0.5 / w, (w + 0.5) / w, -2.0, 3.0]
        ys = [0.0, 1.0, 0.5 / h, (h - 0.5) / h, -0.5 / h, (h + 0.5) / h, 3.0, -2.0]
        for k, (x, y) in enumerate(zip(xs, ys)):
            qi, pi = k % lq, k % p
            loc[k % n, qi, k % m, lvl, pi] = torch.tensor([x, y], dtype=torch.float64)
    w = torch.rand(n, lq, m, n_levels, p, generator=g, dtype=torch.float64)
    w = w / w.sum(dim=(3, 4), keepdim=True)
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    start = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    return value.to(dtype), shapes_t, start, loc.to(dtype), w.to(dtype)


# ----------------------------------------------------------------------------- reference vs loop
@pytest.mark.parametrize("p", [1, 4])
def test_reference_matches_loop_float64(p):
    value, shapes, start, loc, w = make_inputs(SHAPES, p=p, dtype=torch.float64)
    got = ms_deform_attn_core_pytorch(value, SHAPES, loc, w).numpy()
    want = np_ms_deform_attn(value.numpy(), SHAPES, loc.numpy(), w.numpy())
    assert got.shape == (2, 7, 2 * 32)
    # float64 both sides: only rounding of a few products/sums (~1e-16 relative) separates them
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("p", [1, 4])
def test_reference_matches_loop_float32(p):
    value, shapes, start, loc, w = make_inputs(SHAPES, p=p, n=3, lq=5, seed=1)
    got = ms_deform_attn_core_pytorch(value, shapes, loc, w).numpy()  # shapes as a tensor
    want = np_ms_deform_attn(value.numpy(), SHAPES, loc.numpy(), w.numpy())
    # float32: |value| <~ 4, weights sum to 1, <= 12 bilinear samples per head: the float32
    # rounding of coordinates, bilinear weights and the sums stays far below 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loc,expect", [
    ((0.5 / 3, 0.5 / 2), lambda v: v[0, 0]),              # centre of pixel (0, 0)
    ((2.5 / 3, 1.5 / 2), lambda v: v[1, 2]),              # centre of pixel (1, 2)
    ((0.0, 0.0), lambda v: 0.25 * v[0, 0]),               # corner: 3 of 4 neighbours outside
    ((1.0, 1.0), lambda v: 0.25 * v[1, 2]),
    ((1.0 / 3, 0.5 / 2), lambda v: 0.5 * (v[0, 0] + v[0, 1])),  # between two pixels
    ((-0.5 / 3, 0.5 / 2), lambda v: 0.0 * v[0, 0]),       # x*W - 0.5 = -1: nothing left
    ((0.5 / 3, 2.5 / 2), lambda v: 0.0 * v[0, 0]),        # y*H - 0.5 = H: nothing left
    ((-3.0, 0.5), lambda v: 0.0 * v[0, 0]),               # far outside
])
def test_border_semantics_by_hand(loc, expect):
    # one 2x3 map (H=2, W=3), one head, one point, weight 1: hand-computed bilinear values
    v = torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3) * torch.tensor(
        [1.0, -2.0], dtype=torch.float64).view(2, 1, 1)  # (D=2, H, W)
    value = v.flatten(1).t().reshape(1, 6, 1, 2)
    locs = torch.tensor(loc, dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_core_pytorch(value, [(2, 3)], locs, w).view(2)
    want = torch.stack([expect(v[0]), expect(v[1])])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_single_level_single_pixel_is_exact():
    # a 1x1 map sampled at its centre returns the pixel itself, times the weight
    value = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4)
    loc = torch.full((1, 1, 1, 1, 1, 2), 0.5)
    w = torch.full((1, 1, 1, 1, 1), 0.25)
    out = ms_deform_attn_core_pytorch(value, [(1, 1)], loc, w)
    assert torch.equal(out, 0.25 * value.view(1, 1, 4))


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mode", ["eager", "onnx", "plugin", "trt-builtin"])
def test_every_mode_equals_reference_in_eager(mode):
    value, shapes, start, loc, w = make_inputs(SHAPES, seed=2)
    ref = ms_deform_attn_core_pytorch(value, SHAPES, loc, w)
    with msda_mode(mode):
        assert get_msda_mode() == mode
        out = ms_deform_attn(value, shapes, start, loc, w)
    assert get_msda_mode() == "eager"
    # every mode runs the same torch ops in the same order in eager mode -> bit-identical
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


def test_mode_restored_after_error_and_bad_mode_rejected():
    with pytest.raises(RuntimeError):
        with msda_mode("onnx"):
            raise RuntimeError("boom")
    assert get_msda_mode() == "eager"
    with pytest.raises(ValueError, match="unknown mode"):
        with msda_mode("cuda"):
            pass


def test_bad_inputs_raise_value_error():
    value, shapes, start, loc, w = make_inputs(SHAPES)
    with pytest.raises(ValueError, match="value must be a 4-D"):
        ms_deform_attn(value[0], shapes, start, loc, w)
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn(value, shapes[:2], start[:2], loc, w)
    with pytest.raises(ValueError, match="attention_weights shape"):
        ms_deform_attn(value, shapes, start, loc, w[..., :1])
    with pytest.raises(ValueError, match="integer"):
        ms_deform_attn(value, shapes.float(), start, loc, w)


# ----------------------------------------------------------------------------- module
def test_module_parameter_names_and_shapes():
    m = MSDeformAttn(d_model=256, n_levels=3, n_heads=8, n_points=4)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    # sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.* in the R50 keys tsv
    assert got == {"sampling_offsets.weight": (192, 256), "sampling_offsets.bias": (192,),
                   "attention_weights.weight": (96, 256), "attention_weights.bias": (96,),
                   "value_proj.weight": (256, 256), "value_proj.bias": (256,),
                   "output_proj.weight": (256, 256), "output_proj.bias": (256,)}
    # official init: head h's points along direction angle 2*pi*h/M, scaled to |max|=1, k+1 px
    bias = m.sampling_offsets.bias.view(8, 3, 4, 2)
    assert torch.allclose(bias[0, 1, 2], torch.tensor([3.0, 0.0]))
    assert torch.allclose(bias[2, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert torch.allclose(bias[1, 2, 1], torch.tensor([2.0, 2.0]))


def _np_linear(x, lin):
    return x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_forward_matches_numpy(ref_dim):
    torch.manual_seed(0)
    c, m_, l_, p_ = 16, 2, 2, 3
    mod = MSDeformAttn(d_model=c, n_levels=l_, n_heads=m_, n_points=p_).double()
    with torch.no_grad():  # make offsets and attention non-trivial
        for prm in mod.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    shapes = [(4, 6), (2, 3)]
    s = sum(h * w for h, w in shapes)
    n, lq = 2, 5
    query = torch.randn(n, lq, c, dtype=torch.float64)
    inp = torch.randn(n, s, c, dtype=torch.float64)
    ref_pts = torch.rand(n, lq, l_, ref_dim, dtype=torch.float64)
    shapes_t = torch.tensor(shapes)
    start = torch.tensor([0, 24])
    out = mod(query, ref_pts, inp, shapes_t, start).detach().numpy()

    # numpy: value heads, offsets normalised by (W, H) per level (or box-scaled), softmax over
    # the L*P samples of each head, the loop sampler, output projection
    q, x, r = query.numpy(), inp.numpy(), ref_pts.numpy()
    value = _np_linear(x, mod.value_proj).reshape(n, s, m_, c // m_)
    off = _np_linear(q, mod.sampling_offsets).reshape(n, lq, m_, l_, p_, 2)
    logits = _np_linear(q, mod.attention_weights).reshape(n, lq, m_, l_ * p_)
    aw = np.exp(logits - logits.max(-1, keepdims=True))
    aw = (aw / aw.sum(-1, keepdims=True)).reshape(n, lq, m_, l_, p_)
    if ref_dim == 2:
        norm = np.array([[w, h] for h, w in shapes], np.float64)  # (L, 2) as (x, y)
        loc = r[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = r[:, :, None, :, None, :2] + off / p_ * r[:, :, None, :, None, 2:] * 0.5
    want = _np_linear(np_ms_deform_attn(value, shapes, loc, aw), mod.output_proj)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-10)  # float64 on both sides


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    mod = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=1)
    q = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="2 or 4"):
        mod(q, torch.rand(1, 3, 1, 3), torch.randn(1, 6, 16), torch.tensor([[2, 3]]),
            torch.tensor([0]))
    with pytest.raises(ValueError, match="cover"):
        mod(q, torch.rand(1, 3, 1, 2), torch.randn(1, 7, 16), torch.tensor([[2, 3]]),
            torch.tensor([0]))


# ----------------------------------------------------------------------------- ONNX export
class _Wrap(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, loc, w):
        return ms_deform_attn(value, spatial_shapes, level_start_index, loc, w)


_NAMES = ["value", "spatial_shapes", "level_start_index", "sampling_locations",
          "attention_weights"]
_DYN = {"value": {0: "N", 1: "S"}, "sampling_locations": {0: "N", 1: "Lq"},
        "attention_weights": {0: "N", 1: "Lq"}, "out": {0: "N", 1: "Lq"}}


def _export(mode, path, inputs):
    with msda_mode(mode), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrap(), inputs, str(path), dynamo=False, opset_version=17,
                          input_names=_NAMES, output_names=["out"], dynamic_axes=_DYN,
                          custom_opsets=MSDA_CUSTOM_OPSETS if mode != "onnx" else None)


def test_onnx_mode_export_runs_in_onnxruntime_at_two_sizes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "msda.onnx"
    _export("onnx", path, make_inputs(SHAPES, n=1, lq=4, d=8))
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GridSample") == len(SHAPES)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # same graph, two other level sizes (and batch / query counts)
    for shapes, n, lq in [([(9, 4), (5, 2), (3, 1)], 2, 6), ([(6, 11), (3, 6), (2, 3)], 1, 9)]:
        inputs = make_inputs(shapes, n=n, lq=lq, d=8, seed=n + lq)
        feeds = {k: v.numpy() for k, v in zip(_NAMES, inputs)}
        got = sess.run(None, feeds)[0]
        want = ms_deform_attn_core_pytorch(inputs[0], shapes, inputs[3], inputs[4]).numpy()
        assert got.shape == want.shape
        # ONNX Runtime's GridSample computes the same bilinear formula in float32 but with its
        # own operation order; observed differences are ~1e-7, 1e-5 leaves a wide margin while
        # any wrong pixel/level/head would be off by O(0.1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, np_ms_deform_attn(*[feeds[k] for k in ("value",)],
                                                          shapes, feeds["sampling_locations"],
                                                          feeds["attention_weights"]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,op,version", [("plugin", "DvisMSDeformAttn", "1"),
                                             ("trt-builtin", "MultiscaleDeformableAttnPlugin_TRT",
                                              "2")])
def test_plugin_modes_export_one_custom_node(tmp_path, mode, op, version):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / f"{mode}.onnx"
    _export(mode, path, make_inputs(SHAPES, n=1, lq=4, d=8))
    model = onnx.load(str(path))
    custom = [n for n in model.graph.node if n.domain == msda.PLUGIN_DOMAIN]
    assert len(custom) == 1 and custom[0].op_type == op
    assert "GridSample" not in [n.op_type for n in model.graph.node]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    assert attrs == {"plugin_version": version.encode(), "plugin_namespace": b""}
    node = custom[0]
    # inputs: value, int32 spatial_shapes / level_start_index (Casts of the graph inputs),
    # then the sampling locations and attention weights as given
    assert node.input[3] == "sampling_locations" and node.input[4] == "attention_weights"
    producers = {o: n for n in model.graph.node for o in n.output}
    for idx, src in ((1, "spatial_shapes"), (2, "level_start_index")):
        cast = producers[node.input[idx]]
        assert cast.op_type == "Cast" and cast.input[0] == src
        assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.INT32
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    if op == msda.PLUGIN_OP:
        # ours returns the (N,Lq,M*D) contract directly: the node's output is the graph's
        assert node.output[0] == "out" and not consumers
    else:
        # the built-in plugin's 4-D output (N,Lq,M,D) is reshaped to (N,Lq,M*D)
        assert "Reshape" in [n.op_type for n in consumers]
        reshape = next(n for n in consumers if n.op_type == "Reshape")
        assert reshape.input[0] == node.output[0] and reshape.output[0] == "out"
    assert {d.domain: d.version for d in model.opset_import}[msda.PLUGIN_DOMAIN] == 1
