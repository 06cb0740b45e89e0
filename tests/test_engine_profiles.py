"""engine/profiles.py: optimization profiles per stage (no TensorRT needed)."""
from __future__ import annotations

import itertools

import pytest

from dvis_trt.engine import profiles as P
from dvis_trt.runtime import bundle as M
from dvis_trt.runtime.bundle import profiles as RP
from dvis_trt.errors import BundleError, InputError

CONFIG = {"num_classes": 25, "num_queries": 100, "hidden_dim": 256, "mask_dim": 256,
          "num_new_ins": 100, "num_slots": 5, "pixel_mean": [0.0, 0.0, 0.0],
          "pixel_std": [1.0, 1.0, 1.0], "min_size_test": 480, "max_size_test": 1333,
          "size_divisibility": 32, "inference_select_threshold": 0.1,
          "aux_inference_select_threshold": 0.01, "dis_fg_threshold": 0.01,
          "ovis_infer": True, "noise_frame_num": 2, "offline_topk_num": 20, "max_num": 20,
          "refiner_window_size": 3}


def make_manifest(**config_overrides):
    cfg = M.InferenceConfig.from_dict({**CONFIG, **config_overrides})
    d = cfg.dims
    specs = M.stage_specs(d["Q"], d["C"], d["K"], d["N"], d["S"], d["D"])
    stages = {n: M.StageSpec(n, f"{n}.onnx", "0" * 64, i, o) for n, (i, o) in specs.items()}
    return M.BundleManifest(config=cfg, stages=stages)


@pytest.mark.parametrize("hw, expected", [
    ((360, 640), (480, 864)),    # the DESIGN.md example: 480x853 padded to 480x864
    ((640, 360), (864, 480)),    # portrait phone video
    ((720, 1280), (480, 864)),   # 720p shrinks to the same bucket
    ((1080, 1920), (480, 864)),
    ((480, 640), (480, 640)),    # 4:3 needs no padding
    ((100, 1000), (160, 1344)),  # long side capped: 1333 x 133.3 -> int(133.8)=133 -> 160
])
def test_resized_padded_shape_by_hand(hw, expected):
    assert P.resized_padded_shape(*hw, 480, 1333, 32) == expected


def test_resized_padded_shape_agrees_with_runtime_preprocess():
    pre = pytest.importorskip("dvis_trt.runtime.preprocess")
    for h, w in itertools.product([240, 359, 360, 481, 720, 1080, 1919], repeat=2):
        nh, nw = pre.resize_shortest_edge_shape(h, w, 480, 1333)
        assert P.resized_padded_shape(h, w, 480, 1333, 32) == pre.padded_shape(nh, nw, 32)


def test_parse_resolution():
    assert P.parse_resolution("720p") == (1280, 720)
    assert P.parse_resolution(" 640x480 ") == (640, 480)
    for bad in ("720", "x480", "0x480", "hd"):
        with pytest.raises(InputError):
            P.parse_resolution(bad)


def test_buckets_both_orientations():
    assert P.resolution_buckets(["360p", "480p", "720p"], 480, 1333, 32) == \
        [(480, 864), (864, 480)]
    assert P.resolution_buckets(["720p", "640x480"], 480, 1333, 32) == \
        [(480, 864), (864, 480), (480, 640), (640, 480)]
    with pytest.raises(InputError):
        P.resolution_buckets([], 480, 1333, 32)


def _check_well_formed(manifest, profiles):
    for stage_name, plist in profiles.items():
        stage = manifest.stage(stage_name)
        assert plist, stage_name
        for p in plist:
            # every input has a range and nothing else does
            assert set(p.shapes) == {t.name for t in stage.inputs}, stage_name
            for t in stage.inputs:
                lo, opt, hi = p.shapes[t.name]
                assert len(lo) == len(opt) == len(hi) == len(t.shape)
                for a, b, c, d in zip(lo, opt, hi, t.shape):
                    assert 1 <= a <= b <= c, (stage_name, t.name)
                    if isinstance(d, int):
                        assert a == b == c == d
            # every dynamic symbol of the stage has a range
            assert set(p.dims) == stage.symbols, stage_name


def test_default_profiles_r50():
    m = make_manifest()
    profs = P.derive_profiles(m, P.BuildLimits())
    _check_well_formed(m, profs)
    seg = profs["segmenter"]
    assert [p.name for p in seg] == ["480x864", "864x480", "range"]
    assert seg[0].shapes["images"] == ((1, 3, 480, 864), (5, 3, 480, 864), (5, 3, 480, 864))
    assert seg[1].shapes["images"] == ((1, 3, 864, 480), (5, 3, 864, 480), (5, 3, 864, 480))
    assert seg[2].shapes["images"] == ((1, 3, 480, 480), (5, 3, 480, 864), (5, 3, 864, 864))
    # tracker_step: tQ in [1, 2N], slot_index = tQ + S, mask features at stride 4
    step = profs["tracker_step"]
    assert [p.name for p in step] == ["480x864", "864x480", "range"]
    assert step[0].shapes["slot_index"] == ((6,), (37,), (205,))
    assert step[0].shapes["track_queries"] == ((1, 256), (32, 256), (200, 256))
    assert step[1].shapes["mask_features"] == ((256, 216, 120),) * 3
    assert step[0].shapes["frame_embeds"] == ((100, 256),) * 3
    first = profs["tracker_first"]
    assert first[0].shapes["mask_features"] == ((256, 120, 216),) * 3
    # refiner: one profile, Qr exactly N, L in [1, max_frames]
    ref = profs["refiner"]
    assert len(ref) == 1 and ref[0].name == "all"
    assert ref[0].shapes["instance_embeds"] == ((1, 100, 256), (100, 100, 256),
                                                (100, 100, 256))
    # mask head: t in [1, max(window, refiner_window_size)], Qs in [1, max_num]
    mh = profs["mask_head"]
    assert mh[0].shapes["mask_embed"] == ((1, 1, 256), (5, 20, 256), (5, 20, 256))
    assert mh[0].shapes["mask_features"] == ((1, 256, 120, 216), (5, 256, 120, 216),
                                             (5, 256, 120, 216))


def test_user_limits_and_range_mode():
    m = make_manifest()
    lim = P.BuildLimits(window=8, max_frames=40, resolutions=("720p", "640x480"),
                        max_tracks=50, opt_tracks=10, max_num=7, mask_window=2, mode="range")
    profs = P.derive_profiles(m, lim)
    _check_well_formed(m, profs)
    seg = profs["segmenter"]
    assert len(seg) == 1 and seg[0].name == "range"
    assert seg[0].shapes["images"] == ((1, 3, 480, 480), (8, 3, 480, 864), (8, 3, 864, 864))
    assert profs["tracker_step"][0].shapes["slot_index"] == ((6,), (15,), (55,))
    assert profs["refiner"][0].shapes["frame_embeds"] == ((1, 100, 256), (40, 100, 256),
                                                         (40, 100, 256))
    assert profs["mask_head"][0].shapes["mask_embed"] == ((1, 1, 256), (2, 7, 256),
                                                         (2, 7, 256))
    # opt_tracks above max_tracks is clamped
    p2 = P.derive_profiles(m, P.BuildLimits(max_tracks=4, opt_tracks=10))
    assert p2["tracker_step"][0].dims["tQ"] == RP.DimRange(1, 4, 4)


def test_refiner_qr_range_when_topk_exceeds_new_ins():
    # Qr = max(N, min(topk, #tracks)) in the official code
    m = make_manifest(offline_topk_num=150)
    ref = P.derive_profiles(m, P.BuildLimits())["refiner"][0]
    assert ref.dims["Qr"] == RP.DimRange(100, 100, 150)


def test_single_resolution_has_no_covering_profile():
    m = make_manifest()
    profs = P.derive_profiles(m, P.BuildLimits(resolutions=("480x480",)))
    assert [p.name for p in profs["segmenter"]] == ["480x480"]


@pytest.mark.parametrize("kw", [dict(window=0), dict(max_frames=-1), dict(max_tracks=0),
                                dict(mode="exact"), dict(resolutions=("big",))])
def test_bad_limits(kw):
    with pytest.raises(InputError):
        P.derive_profiles(make_manifest(), P.BuildLimits(**kw))


def test_unknown_dynamic_dim_refused():
    m = make_manifest()
    stage = m.stages["refiner"]
    odd = M.StageSpec("refiner", stage.file, stage.sha256,
                      (M.TensorSpec("instance_embeds", "float32", ("L", "Qr", "X")),
                       stage.inputs[1]), stage.outputs)
    m2 = M.BundleManifest(config=m.config, stages={**m.stages, "refiner": odd})
    with pytest.raises(BundleError, match="X"):
        P.derive_profiles(m2, P.BuildLimits())


def test_select_profile_prefers_exact_bucket():
    m = make_manifest()
    seg = P.derive_profiles(m, P.BuildLimits())["segmenter"]
    assert RP.select_profile(seg, {"images": (5, 3, 480, 864)}) == 0
    assert RP.select_profile(seg, {"images": (2, 3, 864, 480)}) == 1
    assert RP.select_profile(seg, {"images": (5, 3, 480, 640)}) == 2   # 4:3 -> covering
    assert RP.select_profile(seg, {"images": (6, 3, 480, 864)}) == -1  # T > window
    assert RP.select_profile(seg, {"images": (1, 3, 480, 1344)}) == -1
    assert "T in [1, 5]" in RP.describe_limits(seg)


def test_profile_dict_roundtrip():
    m = make_manifest()
    for plist in P.derive_profiles(m, P.BuildLimits()).values():
        for p in plist:
            assert RP.Profile.from_dict(p.to_dict()) == p


def test_divisibility_must_allow_stride_4():
    with pytest.raises(BundleError, match="size_divisibility"):
        P.derive_profiles(make_manifest(size_divisibility=2), P.BuildLimits())
