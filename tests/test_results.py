"""YouTube-VIS results and atomic writers (runtime/results.py).

The RLE reference is the official per-frame encode of ``instances_to_coco_json_video``
(``mask_util.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0]``, counts decoded
to utf-8), written out here independently of our vectorised encoder.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_util

from dvis_trt.fileio import atomic_open, atomic_output, atomic_write_json
from dvis_trt.runtime.results import (InstanceTrack, category_id_for, decode_rle, encode_rle,
                                      write_results, ytvis_results)


def _official_rles(masks):
    out = []
    for m in masks:
        rle = mask_util.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0]
        rle["counts"] = rle["counts"].decode("utf-8")
        out.append(rle)
    return out


def _masks(t=5, h=13, w=17, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.random((t, h, w)) > 0.6
    m[1] = False          # empty frame
    m[2] = True           # full frame
    return m


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2 notice
def test_rle_matches_official_encode_and_roundtrips():
    m = _masks()
    ours = encode_rle(m)
    ref = _official_rles(m)
    assert [r["counts"] for r in ours] == [r["counts"] for r in ref]
    assert all(isinstance(r["counts"], str) and r["size"] == [13, 17] for r in ours)
    np.testing.assert_array_equal(decode_rle(ours), m)
    # non-bool input, a single 2-D mask, and decoding by pycocotools itself
    assert encode_rle(m[0].astype(np.float32) * 3)[0]["counts"] == ref[0]["counts"]
    one = mask_util.decode({"size": [13, 17], "counts": ours[3]["counts"].encode()})
    np.testing.assert_array_equal(one.astype(bool), m[3])
    assert encode_rle(np.zeros((0, 4, 4), bool)) == []


def test_decode_none_and_uncompressed_rle():
    m = _masks(t=3, h=6, w=5, seed=1)
    # YouTube-VIS ground truth style: uncompressed counts (list) and None for absent frames
    flat = m[0].flatten(order="F").astype(np.int64)
    runs, cur, n = [], 0, 0
    for v in flat:                       # run lengths starting with zeros
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    segs = [{"size": [6, 5], "counts": runs}, None, encode_rle(m[2])[0]]
    out = decode_rle(segs)
    np.testing.assert_array_equal(out[0], m[0])
    assert not out[1].any()
    np.testing.assert_array_equal(out[2], m[2])
    assert decode_rle([None, None], size=(3, 4)).shape == (2, 3, 4)
    with pytest.raises(ValueError):
        decode_rle([None])
    with pytest.raises(ValueError, match="different sizes"):
        decode_rle([encode_rle(np.ones((2, 2)))[0], encode_rle(np.ones((3, 2)))[0]])


def test_ytvis_results_format():
    m = _masks(t=4, h=8, w=9)
    insts = [InstanceTrack(track_id=12, label=0, score=np.float32(0.75), masks=m),
             InstanceTrack(track_id=3, label=24, score=0.5, masks=~m)]
    res = ytvis_results(42, insts, num_frames=4)
    assert [r["category_id"] for r in res] == [1, 25]          # label + 1 (YTVIS/OVIS ids)
    assert [r["track_id"] for r in res] == [12, 3]
    assert all(r["video_id"] == 42 and type(r["score"]) is float for r in res)
    assert set(res[0]) == {"video_id", "score", "category_id", "segmentations", "track_id"}
    assert res[0]["segmentations"] == _official_rles(m)       # every frame, empties included
    assert res[0]["score"] == pytest.approx(0.75)
    json.dumps(res)                                              # plain JSON types only
    # non-contiguous dataset ids, as the official reverse_id_mapping
    res = ytvis_results(1, insts[:1], category_ids=[4, 7])
    assert res[0]["category_id"] == 4
    assert category_id_for(1, [4, 7]) == 7
    with pytest.raises(ValueError):
        category_id_for(2, [4, 7])
    with pytest.raises(ValueError, match="frames"):
        ytvis_results(1, insts, num_frames=5)
    with pytest.raises(ValueError, match="score"):
        ytvis_results(1, [InstanceTrack(1, 0, float("nan"), masks=m)])


def test_write_results_roundtrip(tmp_path):
    m = _masks(t=3, h=5, w=6)
    res = ytvis_results(9, [InstanceTrack(1, 2, 0.9, masks=m)])
    path = write_results(tmp_path / "out" / "results.json", res)
    loaded = json.loads(path.read_text())
    assert loaded == res
    np.testing.assert_array_equal(decode_rle(loaded[0]["segmentations"]), m)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_json_and_failures_leave_nothing(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(2)})
    assert json.loads(target.read_text()) == {"a": 3, "b": 0.5, "c": [0, 1]}
    before = target.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})
    assert target.read_bytes() == before and _leftovers(tmp_path) == ["r.json"]

    # an error midway through writing: old content kept, temporary file removed
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write('{"partial": ')
            raise RuntimeError("boom")
    assert target.read_bytes() == before and _leftovers(tmp_path) == ["r.json"]

    # a new file that fails: nothing at all
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "new.bin") as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".bin" and tmp.name.startswith(".")
            tmp.write_bytes(b"123")
            raise KeyboardInterrupt
    assert _leftovers(tmp_path) == ["r.json"]

    # a writer that never created the file
    with pytest.raises(FileNotFoundError):
        with atomic_output(tmp_path / "never.bin"):
            pass
    assert _leftovers(tmp_path) == ["r.json"]


def test_atomic_output_success_and_permissions(tmp_path):
    with atomic_output(tmp_path / "sub" / "x.npy") as tmp:
        np.save(tmp, np.arange(3))          # np.save keeps the name: it ends in .npy
    np.testing.assert_array_equal(np.load(tmp_path / "sub" / "x.npy"), np.arange(3))
    assert _leftovers(tmp_path / "sub") == ["x.npy"]
    # the file gets the usual permissions (umask), not a private temp-file mode
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "sub" / "x.npy").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(IsADirectoryError):
        with atomic_output(tmp_path / "sub"):
            pass
