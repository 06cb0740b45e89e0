"""TensorRT for real: build a tiny bundle's engines, run them through TrtBackend, compare with
ONNX Runtime. Skips cleanly when ``tensorrt`` is not importable or there is no CUDA GPU; the
tiny bundle itself is checked with ONNX Runtime everywhere (so the GPU test's inputs are known
good).

The tiny bundle has the real stage contracts (names, dtypes, dynamic dims from STAGE_SPECS) and
toy arithmetic inside (pooling, 1x1 conv, matmuls, gathers), enough to exercise dynamic shapes,
int64 inputs, multiple profiles and the device-resident data flow.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dvis_trt.runtime import bundle as M  # noqa: E402

Q, C, K, N, S = 4, 8, 2, 4, 2  # C == D
CONFIG = {"num_classes": K, "num_queries": Q, "hidden_dim": C, "mask_dim": C,
          "num_new_ins": N, "num_slots": S, "pixel_mean": [0.0, 0.0, 0.0],
          "pixel_std": [1.0, 1.0, 1.0], "min_size_test": 64, "max_size_test": 128,
          "size_divisibility": 32, "inference_select_threshold": 0.1,
          "aux_inference_select_threshold": 0.01, "dis_fg_threshold": 0.01,
          "ovis_infer": True, "noise_frame_num": 2, "offline_topk_num": 2, "max_num": 3,
          "refiner_window_size": 3}

_DT = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}


def _w(name, shape, seed):
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _graph_nodes(stage):
    n = helper.make_node
    if stage == "segmenter":
        nodes = [
            n("AveragePool", ["images"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
            n("Conv", ["pooled", "w_mf"], ["mask_features"]),
            n("ReduceMean", ["mask_features"], ["g"], axes=[2, 3], keepdims=0),  # (T, C)
            n("MatMul", ["g", "w_fe"], ["fe_flat"]),                              # (T, Q*C)
            n("Reshape", ["fe_flat", "shape_tqc"], ["frame_embeds"]),
            n("MatMul", ["frame_embeds", "w_cls"], ["pred_logits"]),
            n("MatMul", ["frame_embeds", "w_mp"], ["mask_pooled"]),
        ]
        inits = [_w("w_mf", (C, 3, 1, 1), 1), _w("w_fe", (C, Q * C), 2),
                 _i64("shape_tqc", [0, Q, C]), _w("w_cls", (C, K + 1), 3),
                 _w("w_mp", (C, C), 4)]
    elif stage == "tracker_first":
        nodes = [
            n("ReduceMean", ["mask_features"], ["g"], axes=[1, 2], keepdims=0),  # (C,)
            n("Add", ["frame_embeds", "g"], ["embeds"]),
            n("MatMul", ["embeds", "w_cls"], ["pred_logits"]),
            n("Relu", ["embeds"], ["track_pos"]),
        ]
        inits = [_w("w_cls", (C, K + 1), 5)]
    elif stage == "tracker_step":
        nodes = [
            n("ReduceMean", ["mask_features"], ["g"], axes=[1, 2], keepdims=0),
            n("Add", ["track_queries", "track_pos"], ["trc"]),
            n("Add", ["frame_embeds", "mask_pooled"], ["fq"]),
            n("Slice", ["fq", "zero", "n_new", "zero"], ["new"]),                 # (N, C)
            n("Add", ["new", "g"], ["new_g"]),
            n("Concat", ["trc", "new_g"], ["embeds"], axis=0),                    # (tQ+N, C)
            n("MatMul", ["embeds", "w_cls"], ["pred_logits"]),
            n("Relu", ["embeds"], ["track_pos_out"]),
            n("Gather", ["frame_embeds", "slot_index"], ["slots"], axis=0),       # (tQ+S, C)
            n("ReduceSum", ["slots", "ax0"], ["slot_sum"], keepdims=1),           # (1, C)
            n("Add", ["track_queries", "slot_sum"], ["slot_feat"]),               # (tQ, C)
            n("MatMul", ["slot_feat", "w_slot"], ["slot_logits"]),
        ]
        inits = [_i64("zero", [0]), _i64("n_new", [N]), _i64("ax0", [0]),
                 _w("w_cls", (C, K + 1), 6), _w("w_slot", (C, K + 1), 7)]
    elif stage == "refiner":
        nodes = [
            n("ReduceMean", ["instance_embeds"], ["m"], axes=[0], keepdims=0),   # (Qr, C)
            n("ReduceMean", ["frame_embeds"], ["fm"], keepdims=0),                # scalar
            n("Add", ["m", "fm"], ["m2"]),
            n("MatMul", ["m2", "w_cls"], ["pred_logits"]),
            n("MatMul", ["instance_embeds", "w_me"], ["mask_embed"]),
        ]
        inits = [_w("w_cls", (C, K + 1), 8), _w("w_me", (C, C), 9)]
    elif stage == "tracker_masks":  # online mode: embeds (tM, C) . mask_features (D, h, w)
        nodes = [
            n("Shape", ["embeds"], ["s_e"], start=0, end=1),                      # [tM]
            n("Shape", ["mask_features"], ["s_mf"], start=1, end=3),              # [h, w]
            n("Reshape", ["mask_features", "shape_flat"], ["mf_flat"]),           # (D, h*w)
            n("MatMul", ["embeds", "mf_flat"], ["m"]),                            # (tM, h*w)
            n("Concat", ["s_e", "s_mf"], ["s_out"], axis=0),
            n("Reshape", ["m", "s_out"], ["pred_masks"]),                         # (tM, h, w)
        ]
        inits = [_i64("shape_flat", [0, -1])]
    else:  # mask_head
        nodes = [
            n("Shape", ["mask_embed"], ["s_me"], start=0, end=2),                 # [t, Qs]
            n("Shape", ["mask_features"], ["s_mf"], start=2, end=4),              # [h, w]
            n("Reshape", ["mask_features", "shape_flat"], ["mf_flat"]),           # (t, C, h*w)
            n("MatMul", ["mask_embed", "mf_flat"], ["m"]),                        # (t, Qs, h*w)
            n("Concat", ["s_me", "s_mf"], ["s_out"], axis=0),
            n("Reshape", ["m", "s_out"], ["m4"]),                                 # (t, Qs, h, w)
            n("Transpose", ["m4"], ["pred_masks"], perm=[1, 0, 2, 3]),
        ]
        inits = [_i64("shape_flat", [0, 0, -1])]
    return nodes, inits


def _dim(d):
    return d if isinstance(d, int) else d  # ONNX dim_param may hold an expression string


def tiny_bundle(folder, msda="plugin"):
    """Write the tiny stage graphs (every stage of ``stage_specs``, online ``tracker_masks`` too) + manifest into ``folder``; returns the manifest."""
    specs = M.stage_specs(Q, C, K, N, S)
    stages = {}
    for name, (ins, outs) in specs.items():
        nodes, inits = _graph_nodes(name)
        g = helper.make_graph(
            nodes, name,
            [helper.make_tensor_value_info(t.name, _DT[t.dtype], [_dim(d) for d in t.shape])
             for t in ins],
            [helper.make_tensor_value_info(t.name, _DT[t.dtype], [_dim(d) for d in t.shape])
             for t in outs], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / f"{name}.onnx"))
        stages[name] = M.StageSpec(name, f"{name}.onnx", "0" * 64, ins, outs)
    m = M.BundleManifest(config=M.InferenceConfig.from_dict(CONFIG), stages=stages, msda=msda,
                         precision="fp32", producer={"dvis_trt": "test"})
    return M.write_manifest(folder, m)


def sample_inputs(rng, tq=3, t=2, hp=64, wp=96, L=5, qs=2, frames=2):
    h, w = hp // 4, wp // 4
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "segmenter": {"images": f(frames, 3, hp, wp)},
        "tracker_first": {"frame_embeds": f(Q, C), "mask_features": f(C, h, w)},
        "tracker_step": {"track_queries": f(tq, C), "track_pos": f(tq, C),
                         "frame_embeds": f(Q, C), "mask_pooled": f(Q, C),
                         "mask_features": f(C, h, w),
                         "slot_index": rng.integers(0, Q, size=tq + S).astype(np.int64)},
        "refiner": {"instance_embeds": f(L, N, C), "frame_embeds": f(L, Q, C)},
        "mask_head": {"mask_embed": f(t, qs, C), "mask_features": f(t, C, h, w)},
        "tracker_masks": {"embeds": f(tq + N, C), "mask_features": f(C, h, w)},
    }


def ort_run(manifest, stage, feed):
    sess = ort.InferenceSession(str(manifest.stage_path(stage)),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feed)))


def test_tiny_bundle_matches_contracts_on_ort(tmp_path):
    m = tiny_bundle(tmp_path)
    m = M.load_manifest(tmp_path)
    rng = np.random.default_rng(0)
    for tq in (1, 3):
        for stage, feed in sample_inputs(rng, tq=tq).items():
            out = ort_run(m, stage, feed)
            expect = m.stage(stage).output_shapes({k: v.shape for k, v in feed.items()})
            assert {k: v.shape for k, v in out.items()} == expect, stage
    # the toy tracker really uses slot_index (a wrong binding would go unnoticed otherwise)
    feed = sample_inputs(rng)["tracker_step"]
    a = ort_run(m, "tracker_step", feed)["slot_logits"]
    feed["slot_index"] = (feed["slot_index"] + 1) % Q
    b = ort_run(m, "tracker_step", feed)["slot_logits"]
    assert not np.allclose(a, b)


def _gpu_ready():
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not importable"
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return False, "cuda-python is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return False, "no CUDA GPU"
    return True, ""


_ok, _why = _gpu_ready()
needs_trt = pytest.mark.skipif(not _ok, reason=_why or "TensorRT available")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from dvis_trt.engine.builder import build_engines
    from dvis_trt.engine.profiles import BuildLimits
    folder = tmp_path_factory.mktemp("tiny_bundle")
    # --msda onnx bundles are refused unless insisted on; the toy graphs have no MSDA at all
    tiny_bundle(folder, msda="onnx")
    limits = BuildLimits(window=2, max_frames=5, resolutions=("96x64",), max_tracks=6,
                         opt_tracks=3, max_num=3, mask_window=2)
    edir = build_engines(folder, limits, allow_gridsample=True, workspace_gib=1.0,
                         log=lambda s: None)
    return folder, edir


@pytest.mark.trt
@needs_trt
def test_build_writes_engine_folder(built):
    from dvis_trt.runtime.backends.trt.loader import machine_info
    from dvis_trt.runtime.bundle.engines import engine_dir_name, load_engine_manifest
    folder, edir = built
    em = load_engine_manifest(edir, verify=True)
    assert edir.name == engine_dir_name(machine_info(), "fp32")
    assert set(em.stages) == set(M.STAGE_NAMES)
    assert len(em.stages["segmenter"].profiles) == 3  # landscape, portrait, covering
    assert (folder / "engines").glob("timing-*.cache")


@pytest.mark.trt
@needs_trt
def test_trt_backend_host_api_matches_ort(built):
    from dvis_trt.runtime.backends.trt import TrtBackend
    folder, edir = built
    m = M.load_manifest(folder)
    rng = np.random.default_rng(1)
    with TrtBackend(edir) as be:
        be.load_all(m)
        for tq in (1, 3, 3, 3, 6):  # repeats: warm-up, capture, replay of the CUDA graph
            for stage, feed in sample_inputs(rng, tq=tq, hp=96, wp=64).items():
                got = be.run(stage, feed)
                ref = ort_run(m, stage, feed)
                for k in ref:
                    # fp32 engines, TF32 off: summation-order differences only
                    np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-4,
                                               err_msg=f"{stage}.{k} tQ={tq}")


@pytest.mark.trt
@needs_trt
def test_trt_backend_resident_flow(built):
    from dvis_trt.runtime.backends.trt import DeviceTensor, TrtBackend
    folder, edir = built
    m = M.load_manifest(folder)
    rng = np.random.default_rng(2)
    images = rng.standard_normal((4, 3, 64, 96)).astype(np.float32)
    ref_seg = ort_run(m, "segmenter", {"images": images})
    with TrtBackend(edir) as be:
        be.load_all(m)
        be.begin_clip(4, 64, 96)
        for f0 in (0, 2):  # two windows of 2 frames into the clip store
            out = be.run_resident("segmenter", {"images": images[f0:f0 + 2]},
                                  fetch=["pred_logits"], frame_offset=f0)
            assert isinstance(out["mask_features"], DeviceTensor)
            np.testing.assert_allclose(out["pred_logits"], ref_seg["pred_logits"][f0:f0 + 2],
                                       rtol=1e-4, atol=1e-4)
        mf = be.clip_store("mask_features", 0, 4)
        np.testing.assert_allclose(be.to_host(mf), ref_seg["mask_features"], rtol=1e-4,
                                   atol=1e-4)
        # tracker step reads frame 3 straight from the store (device-to-device)
        tq = 3
        feed = {"track_queries": rng.standard_normal((tq, C)).astype(np.float32),
                "track_pos": rng.standard_normal((tq, C)).astype(np.float32),
                "frame_embeds": be.clip_store("frame_embeds", 0, 4).frame(3),
                "mask_pooled": ref_seg["mask_pooled"][3],
                "mask_features": mf.frame(3),
                "slot_index": np.arange(tq + S, dtype=np.int64) % Q}
        got = be.run_resident("tracker_step", feed, fetch=["embeds", "slot_logits"])
        ref = ort_run(m, "tracker_step", {**feed, "frame_embeds": ref_seg["frame_embeds"][3],
                                          "mask_features": ref_seg["mask_features"][3]})
        np.testing.assert_allclose(got["embeds"], ref["embeds"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["slot_logits"], ref["slot_logits"], rtol=1e-4,
                                   atol=1e-4)
        # refiner on the store, then mask head on gathered rows + store frames
        inst = rng.standard_normal((4, N, C)).astype(np.float32)
        r = be.run_resident("refiner", {"instance_embeds": inst,
                                        "frame_embeds": be.clip_store("frame_embeds", 0, 4)},
                            fetch=["pred_logits"])
        rref = ort_run(m, "refiner", {"instance_embeds": inst,
                                      "frame_embeds": ref_seg["frame_embeds"]})
        np.testing.assert_allclose(r["pred_logits"], rref["pred_logits"], rtol=1e-4, atol=1e-4)
        rows = [3, 0]
        me = be.gather_rows(r["mask_embed"], rows, 1, 2)
        mh = be.run_resident("mask_head", {"mask_embed": me,
                                           "mask_features": mf.frames(1, 3)},
                             fetch=["pred_masks"])
        mref = ort_run(m, "mask_head", {
            "mask_embed": np.ascontiguousarray(rref["mask_embed"][1:3][:, rows]),
            "mask_features": ref_seg["mask_features"][1:3]})
        np.testing.assert_allclose(mh["pred_masks"], mref["pred_masks"], rtol=1e-4, atol=1e-4)


@pytest.mark.trt
@needs_trt
def test_stale_engine_refused(built, monkeypatch):
    from dvis_trt.runtime.backends.trt import loader
    from dvis_trt.runtime.bundle.engines import MachineInfo
    from dvis_trt.runtime.backends.trt import TrtBackend
    from dvis_trt.errors import BundleError
    folder, edir = built
    m = M.load_manifest(folder)
    real = loader.machine_info()
    monkeypatch.setattr(loader, "machine_info",
                        lambda device=0: MachineInfo("0.0.1", real.gpu_name,
                                                     real.compute_capability))
    with TrtBackend(edir) as be:
        with pytest.raises(BundleError, match="engine built for TensorRT"):
            be.load_stage("segmenter", m)


@pytest.mark.trt
@needs_trt
def test_check_engines_against_ort(built):
    from dvis_trt.engine.builder import check_engines
    folder, edir = built
    assert check_engines(folder, engine_dir=str(edir), log=lambda s: None)
