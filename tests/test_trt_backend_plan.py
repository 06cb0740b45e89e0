"""runtime/backends/trt/: the parts that need no GPU — buffer planning, profile
limits, CUDA-graph bookkeeping, device-tensor views, lazy imports."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from dvis_trt.engine.profiles import BuildLimits, derive_profiles
from dvis_trt.runtime.bundle.profiles import DimRange, Profile
from dvis_trt.runtime import bundle as M
from dvis_trt.runtime.backends import trt as TB
from dvis_trt.errors import DependencyError

# tiny dims: Q=4 frame queries, C=D=8, K=2 classes (3 logits), N=4 new-instance queries, S=2
SPECS = {n: M.StageSpec(n, f"{n}.onnx", "0" * 64, i, o)
         for n, (i, o) in M.stage_specs(Q=4, C=8, K=2, N=4, S=2).items()
         if n in M.STAGE_NAMES}  # the offline stages (tracker_masks: test_online_trt_plan)
LIMITS = {"segmenter": {"T": 2, "Hp": 64, "Wp": 96},
          "tracker_first": {"h": 16, "w": 24},
          "tracker_step": {"tQ": 6, "h": 16, "w": 24},
          "refiner": {"L": 10, "Qr": 4},
          "mask_head": {"t": 3, "Qs": 5, "h": 16, "w": 24}}


def test_plan_sizes_by_hand():
    plan = TB.plan_buffers(SPECS, LIMITS)
    # clip stores hold L=10 frames: mask features 8*16*24 floats/frame, frame embeds 4*8
    assert plan.frame_bytes == {"mask_features": 12288, "frame_embeds": 128}
    assert plan.stores == {"mask_features": 122880, "frame_embeds": 1280}
    # every other tensor: max shape x 4 bytes, rounded up to 256
    assert plan.device == {
        ("segmenter", "images"): 2 * 3 * 64 * 96 * 4,
        ("segmenter", "pred_logits"): 256,          # 96 bytes
        ("segmenter", "mask_pooled"): 256,
        ("tracker_first", "embeds"): 256,
        ("tracker_first", "pred_logits"): 256,
        ("tracker_first", "track_pos"): 256,
        ("tracker_step", "track_queries"): 256,     # 6*8*4 = 192
        ("tracker_step", "track_pos"): 256,
        ("tracker_step", "frame_embeds"): 256,
        ("tracker_step", "mask_pooled"): 256,
        ("tracker_step", "mask_features"): 12288,
        ("tracker_step", "slot_index"): 256,        # (6+2) int64 = 64 bytes
        ("tracker_step", "embeds"): 512,            # (6+4)*8*4 = 320
        ("tracker_step", "pred_logits"): 256,
        ("tracker_step", "slot_logits"): 256,
        ("tracker_step", "track_pos_out"): 512,
        ("refiner", "instance_embeds"): 1280,
        ("refiner", "pred_logits"): 256,
        ("refiner", "mask_embed"): 1280,
        ("mask_head", "mask_embed"): 512,           # 3*5*8*4 = 480
        ("mask_head", "pred_masks"): 23040,         # 5*3*16*24*4
    }
    # segmenter outputs land in the stores; refiner / mask head / first tracker read them
    assert plan.views == {("segmenter", "mask_features"): "mask_features",
                          ("segmenter", "frame_embeds"): "frame_embeds",
                          ("refiner", "frame_embeds"): "frame_embeds",
                          ("mask_head", "mask_features"): "mask_features",
                          ("tracker_first", "mask_features"): "mask_features",
                          ("tracker_first", "frame_embeds"): "frame_embeds"}
    assert plan.device_total == 314368
    # pinned: host-fed inputs and host-fetched outputs only; images double-buffered
    assert plan.pinned[("segmenter", "images")] == 2 * 147456
    assert plan.pinned[("segmenter", "frame_embeds")] == 256
    assert plan.pinned[("mask_head", "pred_masks")] == 23040
    assert ("segmenter", "mask_features") not in plan.pinned
    assert ("refiner", "mask_embed") not in plan.pinned
    assert ("tracker_step", "mask_features") not in plan.pinned
    assert plan.pinned_total == (294912 + 256 + 256 + 3 * 256 + 3 * 256
                                 + 512 + 256 + 256 + 512 + 1280 + 256 + 23040)


def test_plan_clip_frames_override_and_missing_limit():
    plan = TB.plan_buffers(SPECS, LIMITS, clip_frames=3)
    assert plan.stores == {"mask_features": 3 * 12288, "frame_embeds": 512}  # 384 -> 512
    bad = {**LIMITS, "tracker_step": {"h": 16, "w": 24}}
    with pytest.raises(ValueError, match="tQ"):
        TB.plan_buffers(SPECS, bad)


def test_profile_max_dims_from_derived_profiles():
    cfg = M.InferenceConfig.from_dict({
        "num_classes": 2, "num_queries": 4, "hidden_dim": 8, "mask_dim": 8, "num_new_ins": 4,
        "num_slots": 2, "pixel_mean": [0, 0, 0], "pixel_std": [1, 1, 1], "min_size_test": 64,
        "max_size_test": 128, "size_divisibility": 32, "inference_select_threshold": 0.1,
        "aux_inference_select_threshold": 0.01, "dis_fg_threshold": 0.01, "ovis_infer": True,
        "noise_frame_num": 2, "offline_topk_num": 2, "max_num": 5, "refiner_window_size": 3})
    m = M.BundleManifest(config=cfg, stages=SPECS)
    profs = derive_profiles(m, BuildLimits(window=2, max_frames=10, max_tracks=6,
                                           resolutions=("96x64",)))
    limits = {s: TB.profile_max_dims(p) for s, p in profs.items()}
    # 96x64 landscape -> short side 64, long 96 -> (64, 96); portrait (96, 64): max over both
    assert limits["segmenter"] == {"T": 2, "Hp": 96, "Wp": 96, "h": 24, "w": 24}
    assert limits["tracker_step"] == {"tQ": 6, "h": 24, "w": 24}
    assert limits["refiner"] == {"L": 10, "Qr": 4}
    assert limits["mask_head"] == {"t": 3, "Qs": 5, "h": 24, "w": 24}
    plan = TB.plan_buffers(SPECS, limits)
    assert plan.stores["mask_features"] == 10 * 8 * 24 * 24 * 4


def test_graph_cache_warmup_capture_replay_evict():
    gc = TB.GraphCache(capacity=2)
    k1, k2, k3 = ("tracker_step", 0, 3), ("tracker_step", 0, 4), ("tracker_step", 1, 3)
    assert gc.should_capture(k1) is False      # warm-up call
    assert gc.get(k1) is None
    assert gc.should_capture(k1) is True       # second call captures
    assert gc.put(k1, "g1") is None
    assert gc.get(k1) == "g1"
    assert gc.should_capture(k1) is False      # cached: replay, no re-capture
    gc.should_capture(k2)
    gc.should_capture(k2)
    gc.put(k2, "g2")
    gc.get(k1)                                 # k1 most recently used
    gc.should_capture(k3)
    gc.should_capture(k3)
    assert gc.put(k3, "g3") == "g2"            # least recently used evicted
    assert len(gc) == 2
    assert sorted(gc.clear()) == ["g1", "g3"] and len(gc) == 0


def test_device_tensor_views():
    t = TB.DeviceTensor(1000, (10, 8, 16, 24), np.dtype(np.float32))
    frame = 8 * 16 * 24 * 4
    v = t.frames(3, 5)
    assert v.ptr == 1000 + 3 * frame and v.shape == (2, 8, 16, 24)
    f = t.frame(9)
    assert f.ptr == 1000 + 9 * frame and f.shape == (8, 16, 24) and f.nbytes == frame
    with pytest.raises(IndexError):
        t.frames(9, 11)
    with pytest.raises(IndexError):
        t.frame(10)


def test_module_imports_without_gpu_packages():
    # a fresh interpreter: importing the backend must not import tensorrt or cuda
    code = ("import sys; import dvis_trt.runtime.backends.trt; "
            "import dvis_trt.engine.builder, dvis_trt.engine.cli_build; "
            "print(any(m == 'tensorrt' or m.startswith('cuda') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tensorrt is installed here")
def test_backend_without_tensorrt_is_one_clear_error():
    with pytest.raises(DependencyError, match="TensorRT"):
        TB.TrtBackend()


def test_profile_contains():
    p = Profile("x", {"tQ": DimRange(1, 2, 6)},
                {"track_queries": ((1, 8), (2, 8), (6, 8)), "slot_index": ((3,), (4,), (8,))})
    assert p.contains({"track_queries": (6, 8), "slot_index": (8,)})
    assert not p.contains({"track_queries": (7, 8), "slot_index": (9,)})
    assert not p.contains({"track_queries": (6, 8, 1)})
