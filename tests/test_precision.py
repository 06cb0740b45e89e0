"""engine/precision.py: mixed-precision conversion keeps the fragile ops in fp32.

Graphs are tiny and built with onnx.helper; the expected kept/converted node sets are written
out by hand from the graph structure (not computed by the code under test), and the converted
graphs are run with ONNX Runtime against the fp32 originals.
"""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dvis_trt.export import precision as P  # noqa: E402
from dvis_trt.errors import InputError  # noqa: E402

RNG = np.random.default_rng(0)


def _init(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def attention_model():
    """x (N,8) -> LayerNorm -> single-head masked attention -> mask-pool style normalisation."""
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "ln_w", "ln_b"], ["ln"], name="ln", axis=-1),
        n("MatMul", ["ln", "wq"], ["q"], name="proj_q"),
        n("MatMul", ["ln", "wk"], ["k"], name="proj_k"),
        n("MatMul", ["ln", "wv"], ["v"], name="proj_v"),
        n("Transpose", ["k"], ["kt"], name="k_t", perm=[1, 0]),
        n("MatMul", ["q", "kt"], ["logits"], name="qk"),
        n("Mul", ["logits", "scale"], ["scaled"], name="scale_mul"),
        n("Add", ["scaled", "mask_bias"], ["masked"], name="mask_add"),
        n("Softmax", ["masked"], ["attn"], name="softmax", axis=-1),
        n("MatMul", ["attn", "v"], ["ctx"], name="attn_v"),
        n("Relu", ["ctx"], ["act"], name="relu"),
        n("ReduceSum", ["act", "ax0"], ["tot"], name="reduce_sum", keepdims=1),
        n("Add", ["tot", "eps"], ["tot_eps"], name="eps_add"),
        n("Div", ["act", "tot_eps"], ["normed"], name="norm_div"),
        n("MatMul", ["normed", "wo"], ["y"], name="proj_out"),
    ]
    inits = [_const("ln_w", np.ones(8)), _const("ln_b", np.zeros(8)),
             _init("wq", (8, 8)), _init("wk", (8, 8)), _init("wv", (8, 8)), _init("wo", (8, 4)),
             _const("scale", 8 ** -0.5), _const("eps", 1e-6),
             numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    # mask bias: -1e4 on the last column (a masked key), as masked attention does
    bias = np.zeros((6, 6), np.float32)
    bias[:, -1] = -1e4
    inits.append(numpy_helper.from_array(bias, "mask_bias"))
    g = helper.make_graph(nodes, "attn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def gridsample_msda_model():
    """One-level deformable sampling the way the --msda onnx export does it: offsets from a
    Linear, normalised, added to reference points, mapped by 2*loc-1, GridSample on a value map
    that is itself computed by a (convertible) 1x1 Conv."""
    n = helper.make_node
    nodes = [
        n("Conv", ["feat", "wv"], ["value"], name="value_proj"),
        n("MatMul", ["query", "woff"], ["off"], name="offset_proj"),
        n("Reshape", ["off", "off_shape"], ["off4"], name="off_reshape"),
        n("Div", ["off4", "normalizer"], ["off_n"], name="off_div"),
        n("Add", ["ref", "off_n"], ["loc"], name="loc_add"),
        n("Mul", ["loc", "two"], ["loc2"], name="grid_mul"),
        n("Sub", ["loc2", "one"], ["grid"], name="grid_sub"),
        n("GridSample", ["value", "grid"], ["sampled"], name="grid_sample",
          align_corners=0, mode="bilinear", padding_mode="zeros"),
        n("Relu", ["sampled"], ["y"], name="relu"),
    ]
    ref = RNG.uniform(0.1, 0.9, size=(1, 5, 1, 2)).astype(np.float32)
    inits = [_init("wv", (4, 3, 1, 1)), _init("woff", (2, 2), 0.5),
             numpy_helper.from_array(np.array([1, 5, 1, 2], np.int64), "off_shape"),
             _const("normalizer", [16.0, 12.0]), numpy_helper.from_array(ref, "ref"),
             _const("two", 2.0), _const("one", 1.0)]
    g = helper.make_graph(
        nodes, "msda",
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, 3, 12, 16]),
         helper.make_tensor_value_info("query", TensorProto.FLOAT, [5, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def plugin_msda_model():
    """A DvisMSDeformAttn custom node (domain dvis_trt) fed by a Linear for sampling locations."""
    n = helper.make_node
    nodes = [
        n("MatMul", ["query", "wloc"], ["loc_lin"], name="loc_proj"),
        n("Sigmoid", ["loc_lin"], ["loc_sig"], name="loc_sigmoid"),
        n("Reshape", ["loc_sig", "loc_shape"], ["loc"], name="loc_reshape"),
        n("MatMul", ["query", "wattn"], ["aw_lin"], name="attn_proj"),
        n("Reshape", ["aw_lin", "aw_shape"], ["aw"], name="aw_reshape"),
        n("MatMul", ["value_in", "wval"], ["value"], name="value_proj"),
        n("DvisMSDeformAttn", ["value", "shapes", "starts", "loc", "aw"], ["msda"],
          name="msda", domain="dvis_trt", plugin_version="1", plugin_namespace=""),
        n("MatMul", ["msda", "wout"], ["y"], name="out_proj"),
    ]
    inits = [_init("wloc", (8, 8)), _init("wattn", (8, 4)), _init("wval", (2, 2)),
             _init("wout", (4, 4)),
             numpy_helper.from_array(np.array([1, 5, 2, 1, 2, 2], np.int64), "loc_shape"),
             numpy_helper.from_array(np.array([1, 5, 2, 1, 2], np.int64), "aw_shape"),
             numpy_helper.from_array(np.array([[2, 3]], np.int64), "shapes"),
             numpy_helper.from_array(np.array([0], np.int64), "starts")]
    g = helper.make_graph(
        nodes, "plugin",
        [helper.make_tensor_value_info("query", TensorProto.FLOAT, [1, 5, 8]),
         helper.make_tensor_value_info("value_in", TensorProto.FLOAT, [1, 6, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("dvis_trt", 1)])


def node_output_types(model):
    """node name -> elem type of its first output, from ONNX shape/type inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.output)
             + list(inferred.graph.input)}
    return {n.name: types.get(n.output[0]) for n in inferred.graph.node}


def node_input_types(model, name):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    node = next(n for n in inferred.graph.node if n.name == name)
    return [types.get(x) for x in node.input]


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_kept_nodes_attention_by_hand():
    kept = P.kept_fp32_nodes(attention_model())
    assert kept == {
        "ln": "op-type", "softmax": "op-type", "reduce_sum": "op-type",
        "qk": "attention-logits", "scale_mul": "attention-logits",
        "mask_add": "attention-logits",
        "norm_div": "normalising-division", "eps_add": "normalising-division",
    }


def test_fp16_attention_dtypes_and_numerics():
    model = attention_model()
    out, report = P.convert_precision(model, "fp16")
    assert report.converter == "ort"
    types = node_output_types(out)
    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    for name in ("ln", "qk", "scale_mul", "mask_add", "softmax", "reduce_sum", "eps_add",
                 "norm_div"):
        assert types[name] == F, name
    for name in ("proj_q", "proj_k", "proj_v", "k_t", "attn_v", "relu", "proj_out"):
        assert types[name] == H, name
    # the kept MatMul really computes in fp32: both of its inputs are float32
    assert node_input_types(out, "qk") == [F, F]
    # graph I/O unchanged
    assert out.graph.input[0].type.tensor_type.elem_type == F
    assert out.graph.output[0].type.tensor_type.elem_type == F
    # topologically sorted (every input produced earlier or a graph input/initializer)
    known = {i.name for i in out.graph.input} | {i.name for i in out.graph.initializer}
    for n in out.graph.node:
        assert all(x in known for x in n.input if x), n.name
        known.update(n.output)
    # numerics: fp16 matmuls on O(1) values -> relative error ~1e-3; 2e-2 leaves margin
    x = RNG.standard_normal((6, 8)).astype(np.float32)
    ref = run(model, {"x": x})
    got = run(out, {"x": x})
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-3)
    # the masked key got ~0 weight in both (a fp16 logit path would still be fine here, but
    # the check guards that the -1e4 bias survived the conversion)
    assert got.dtype == np.float32


def test_input_model_not_modified():
    model = attention_model()
    before = model.SerializeToString()
    P.convert_precision(model, "fp16")
    assert model.SerializeToString() == before


def test_gridsample_coordinates_kept():
    model = gridsample_msda_model()
    kept = P.kept_fp32_nodes(model)
    assert set(kept) == {"grid_sample", "grid_sub", "grid_mul", "loc_add", "off_div",
                         "off_reshape", "offset_proj"}
    out, _ = P.convert_precision(model, "fp16")
    types = node_output_types(out)
    assert types["value_proj"] == TensorProto.FLOAT16
    assert types["relu"] == TensorProto.FLOAT16
    for name in kept:
        assert types[name] == TensorProto.FLOAT, name
    feat = RNG.standard_normal((1, 3, 12, 16)).astype(np.float32)
    query = RNG.standard_normal((5, 2)).astype(np.float32)
    ref = run(model, {"feat": feat, "query": query})
    got = run(out, {"feat": feat, "query": query})
    # value map is fp16 (3-term 1x1 conv, |v| ~ 1): ~1e-3 relative
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=5e-3)


def test_plugin_node_and_locations_kept():
    model = plugin_msda_model()
    kept = P.kept_fp32_nodes(model)
    # the location path back to its Linear; the attention-weight and value paths are not kept
    assert set(kept) == {"msda", "loc_reshape", "loc_sigmoid", "loc_proj"}
    out, _ = P.convert_precision(model, "fp16")
    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    # every float input of the custom node is float32 (casts inserted on value / weights)
    ins = node_input_types(out, "msda")
    assert ins[0] == F and ins[3] == F and ins[4] == F
    types = node_output_types(out)
    assert types["value_proj"] == H and types["attn_proj"] == H and types["out_proj"] == H
    assert types["loc_proj"] == F


def test_fp32_is_passthrough_and_bad_args():
    model = attention_model()
    out, report = P.convert_precision(model, "fp32")
    assert report.kept == {} and len(out.graph.node) == len(model.graph.node)
    with pytest.raises(InputError):
        P.convert_precision(model, "int8")
    with pytest.raises(InputError):
        P.convert_precision(model, "bf16", converter="ort")


def test_topological_sort_fixes_order():
    original = attention_model()
    model = onnx.ModelProto()
    model.CopyFrom(original)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    P.topological_sort(model.graph)
    onnx.checker.check_model(model)
    x = RNG.standard_normal((6, 8)).astype(np.float32)
    assert [n.name for n in model.graph.node] != [n.name for n in reversed(nodes)]
    np.testing.assert_array_equal(run(model, {"x": x}), run(original, {"x": x}))


def test_convert_file_roundtrip(tmp_path):
    src = tmp_path / "a.onnx"
    onnx.save(attention_model(), str(src))
    dst = tmp_path / "a16.onnx"
    report = P.convert_file(src, dst, "fp16")
    assert dst.is_file() and "kept fp32" in report.summary()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _has_modelopt():
    return P.available_converters()["modelopt"]


@pytest.mark.skipif(not _has_modelopt(), reason="NVIDIA ModelOpt AutoCast not installed")
def test_bf16_modelopt_dtypes():
    model = attention_model()
    out, report = P.convert_precision(model, "bf16")
    assert report.converter == "modelopt"
    types = node_output_types(out)
    for name in ("ln", "qk", "scale_mul", "mask_add", "softmax", "reduce_sum", "norm_div"):
        assert types[name] == TensorProto.FLOAT, name
    for name in ("proj_q", "proj_v", "attn_v", "proj_out"):
        assert types[name] == TensorProto.BFLOAT16, name
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
