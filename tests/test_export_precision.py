"""`dvis-trt export --precision fp16`: the graphs say fp16, sensitive ops stay fp32, I/O float32."""
import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


def test_fp16_refiner_graph_keeps_sensitive_ops_fp32_and_stays_close(tiny_eager, tmp_path):
    from dvis_trt.export.onnx_export import export_bundle
    from dvis_trt.export.config import load_config
    from dvis_trt.runtime.bundle import load_manifest

    from pathlib import Path
    cfg = load_config(Path(__file__).resolve().parents[1] / "export" / "configs" / "tiny.yaml")
    export_bundle(tiny_eager, cfg, tmp_path / "b16", precision="fp16",
                  stages=("refiner", "mask_head"))
    manifest = load_manifest(tmp_path / "b16", require_stages=("refiner", "mask_head"))
    assert manifest.precision == "fp16"
    model = onnx.load(str(tmp_path / "b16" / "refiner.onnx"))
    f16 = onnx.TensorProto.FLOAT16
    assert any(t.data_type == f16 for t in model.graph.initializer)       # weights in fp16
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT   # graph I/O float32
               for i in list(model.graph.input) + list(model.graph.output))
    # LayerNorm / Softmax / reductions are fed fp32 (a Cast to float in front, or fp32 inputs)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({i.name: i.type.tensor_type.elem_type for i in inferred.graph.input})
    sensitive = [n for n in inferred.graph.node
                 if n.op_type in ("LayerNormalization", "Softmax", "ReduceMean")]
    assert sensitive
    for node in sensitive:
        assert types.get(node.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, node.name

    rng = np.random.default_rng(0)
    c = cfg.MODEL.MASK_FORMER.HIDDEN_DIM
    inst = rng.standard_normal((6, cfg.MODEL.VIDEO_HEAD.NUM_NEW_INS, c)).astype(np.float32)
    fe = rng.standard_normal((6, cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, c)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "b16" / "refiner.onnx"),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"instance_embeds": inst, "frame_embeds": fe})
    with torch.no_grad():
        ref = tiny_eager.refiner.forward_stage(torch.from_numpy(inst), torch.from_numpy(fe))
    for g, r in zip(got, ref):
        r = r.numpy()
        # fp16 weights and activations: ~3 decimal digits, a few roundings deep -> 2 % of range
        assert np.abs(g - r).max() <= 2e-2 * np.abs(r).max() + 1e-3
