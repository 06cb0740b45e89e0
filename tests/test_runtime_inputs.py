"""Real inputs through ``dvis-trt run``: rotation metadata, odd sizes, grayscale / 4:4:4 / 4:2:2,
a 1-frame clip, a clip shorter than the window, corrupt / empty / 0-frame files, folders of
JPEGs (and a YouTube-VIS dataset json).

Oracles: the eager ``DvisDaqOffline`` on the frames (parity tolerances as in
``test_e2e_parity.py``), or the runtime pipeline run in-process on frames decoded independently
(PyAV ``to_ndarray`` / Pillow, rotated with numpy) — same backend, same pixels, so the results
must be identical; a runner that mis-rotates, drops, reorders or mis-converts frames fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from dvis_trt.runtime.cli import main
from dvis_trt.runtime.results import decode_rle
from dvis_trt.runtime.synthetic import encode_frames, make_broken_videos, render_scene

torch = pytest.importorskip("torch")

SCORE_TOL = 1e-4  # see test_e2e_parity.py
IOU_MIN = 0.999


def _run(args, capsys):
    rc = main(["run", *map(str, args), "--backend", "ort", "--threads", "2", "--quiet"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _decode_independently(path) -> list:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _results_of(runner, frames, video_id=1):
    """The pipeline run in-process on given frames, as comparable tuples."""
    res = runner.pipeline.run_video(frames)
    return [(int(res.track_ids[i]), int(res.labels[i]) + 1, float(res.scores[i]),
             [s["counts"] for s in res.segmentations[i]]) for i in range(len(res.scores))]


def _as_tuples(results):
    return [(r["track_id"], r["category_id"], r["score"], [s["counts"] for s in r["segmentations"]])
            for r in results]


def _assert_same(results, expected):
    got = _as_tuples(results)
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    np.testing.assert_allclose([g[2] for g in got], [e[2] for e in expected], rtol=0, atol=1e-6)
    assert [g[3] for g in got] == [e[3] for e in expected]


def _assert_matches_eager(results, ref):
    assert len(results) == len(ref["scores"]) > 0
    assert [r["category_id"] - 1 for r in results] == [int(x) for x in ref["labels"]]
    assert [r["track_id"] for r in results] == [int(x) for x in ref["track_ids"]]
    np.testing.assert_allclose([r["score"] for r in results], ref["scores"], rtol=0,
                               atol=SCORE_TOL)
    for k, r in enumerate(results):
        a, b = decode_rle(r["segmentations"]), ref["masks"][k]
        inter, union = (a & b).sum((1, 2)), (a | b).sum((1, 2))
        assert np.where(union > 0, inter / np.maximum(union, 1), 1).min() >= IOU_MIN


@pytest.fixture(scope="module")
def scene():
    frames, _, _ = render_scene(10, (120, 200), seed=2)
    return frames


@pytest.mark.parametrize("container,as_tag", [(".mp4", False), (".mkv", True)])
def test_rotation_metadata_is_applied(tmp_path, scene, tiny_runner, capsys, container, as_tag):
    """A clip stored 120x200 with a 90-degree display rotation runs as 200x120 (display
    matrix in MP4; the legacy ``rotate`` tag in MKV), exactly like the upright frames."""
    plain = encode_frames(tmp_path / f"plain{container}", scene)
    rotated = encode_frames(tmp_path / f"rot{container}", scene, rotate=90, rotate_as_tag=as_tag)
    upright = [np.ascontiguousarray(np.rot90(f, k=-1)) for f in _decode_independently(plain)]
    assert upright[0].shape == (200, 120, 3)
    expected = _results_of(tiny_runner(), upright)
    out = tmp_path / "r.json"
    rc, _, err = _run([tiny_runner().manifest.root, rotated, "-o", out], capsys)
    assert rc == 0, err
    results = json.loads(out.read_text())
    assert {tuple(s["size"]) for r in results for s in r["segmentations"]} == {(200, 120)}
    _assert_same(results, expected)


@pytest.mark.parametrize("codec,pix_fmt,suffix", [("ffv1", "gray", ".mkv"),
                                                  ("libx264", "yuv444p", ".mp4"),
                                                  ("libx264", "yuv422p", ".mp4")])
def test_pixel_formats(tmp_path, scene, tiny_runner, capsys, codec, pix_fmt, suffix):
    path = encode_frames(tmp_path / f"v{suffix}", scene, codec=codec, pix_fmt=pix_fmt)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == pix_fmt
    frames = _decode_independently(path)
    if pix_fmt == "gray":
        assert all((f[..., 0] == f[..., 1]).all() and (f[..., 1] == f[..., 2]).all()
                   for f in frames)
    expected = _results_of(tiny_runner(), frames)
    out = tmp_path / "r.json"
    rc, _, err = _run([tiny_runner().manifest.root, path, "-o", out], capsys)
    assert rc == 0, err
    _assert_same(json.loads(out.read_text()), expected)


@pytest.mark.parametrize("num_frames,window", [(1, 5), (3, 5), (7, 3)])
def test_short_clips_match_eager(tmp_path, tiny_bundle, tiny_eager, capsys, num_frames, window):
    """A 1-frame clip (tracker_first only), a clip shorter than the window, and a clip whose
    last window is partial, at an odd size."""
    frames, _, _ = render_scene(num_frames, (333, 501), seed=0)
    path = encode_frames(tmp_path / "short.mp4", frames)
    decoded = _decode_independently(path)
    assert len(decoded) == num_frames
    with torch.no_grad():
        ref = tiny_eager(decoded)
    out = tmp_path / "r.json"
    rc, _, err = _run([tiny_bundle, path, "-o", out, "--window", window], capsys)
    assert rc == 0, err
    results = json.loads(out.read_text())
    assert all(len(r["segmentations"]) == num_frames for r in results)
    assert {tuple(s["size"]) for r in results for s in r["segmentations"]} == {(333, 501)}
    _assert_matches_eager(results, ref)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return make_broken_videos(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("kind,words", [("empty", "empty file"), ("corrupt", "corrupt"),
                                        ("truncated", "truncated"), ("not_video", "cannot open"),
                                        ("no_frames", "no decodable"),
                                        ("audio_only", "no video stream")])
def test_a_bad_video_alone_is_one_line_and_nothing_is_written(tmp_path, tiny_bundle, broken,
                                                              capsys, kind, words):
    out = tmp_path / "r.json"
    rc, stdout, err = _run([tiny_bundle, broken[kind], "-o", out], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dvis-trt: error:"), err
    assert words in lines[0] and str(broken[kind].name) in lines[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left either


def test_bad_videos_in_a_batch_are_reported_and_the_others_still_run(tmp_path, tiny_bundle,
                                                                     broken, demo_mp4, capsys):
    out = tmp_path / "r.json"
    good = demo_mp4.path
    rc, _, err = _run([tiny_bundle, broken["empty"], good, broken["no_frames"],
                       broken["corrupt"], tmp_path / "missing.mp4", "-o", out], capsys)
    assert rc == 2
    skipped = [ln for ln in err.splitlines() if ln.startswith("dvis-trt: skipped")]
    assert len(skipped) == 4
    for name in ("empty", "no_frames", "corrupt", "missing"):
        assert sum(f"] {name}: " in ln for ln in skipped) == 1, (name, skipped)
    assert "4 of 5 videos were skipped" in err
    results = json.loads(out.read_text())
    assert results and {r["video_id"] for r in results} == {2}  # the good one, 2nd in order
    assert all(len(r["segmentations"]) == demo_mp4.frames.shape[0] for r in results)


def _write_jpegs(folder: Path, frames) -> list:
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i * 5:05d}.jpg", quality=95)
    return [np.asarray(Image.open(folder / f"{i * 5:05d}.jpg").convert("RGB"))
            for i in range(len(frames))]


def test_folder_of_jpegs_matches_eager(tmp_path, tiny_bundle, tiny_eager, capsys):
    frames, _, _ = render_scene(9, (150, 251), seed=4)
    read_back = _write_jpegs(tmp_path / "JPEGImages" / "vid_a", frames)
    with torch.no_grad():
        ref = tiny_eager(read_back)
    out = tmp_path / "r.json"
    rc, _, err = _run([tiny_bundle, tmp_path / "JPEGImages" / "vid_a", "-o", out], capsys)
    assert rc == 0, err
    _assert_matches_eager(json.loads(out.read_text()), ref)


def test_jpegimages_root_and_ytvis_json(tmp_path, tiny_bundle, tiny_runner, capsys):
    """A ``JPEGImages/`` root runs one video per sub-folder (natural order); a YouTube-VIS json
    runs its videos with their ids and maps labels through its category ids."""
    root = tmp_path / "JPEGImages"
    fa, _, _ = render_scene(4, (96, 128), seed=5)
    fb, _, _ = render_scene(6, (96, 128), seed=6)
    read_a = _write_jpegs(root / "vid10", fa)
    read_b = _write_jpegs(root / "vid9", fb)
    out = tmp_path / "r.json"
    rc, _, err = _run([tiny_bundle, root, "-o", out], capsys)
    assert rc == 0, err
    results = json.loads(out.read_text())
    by_video = {v: [r for r in results if r["video_id"] == v] for v in (1, 2)}
    runner = tiny_runner()
    _assert_same(by_video[1], _results_of(runner, read_b))  # vid9 sorts before vid10
    _assert_same(by_video[2], _results_of(runner, read_a))

    k = runner.settings.num_classes
    cats = [{"id": 100 + 2 * i, "name": f"c{i}"} for i in reversed(range(k))]  # unsorted on disk
    ds = {"videos": [{"id": 42, "file_names": [f"vid10/{i * 5:05d}.jpg" for i in range(4)],
                      "height": 96, "width": 128, "length": 4},
                     {"id": 7, "file_names": [f"vid9/{i * 5:05d}.jpg" for i in range(6)],
                      "height": 96, "width": 128, "length": 6}],
          "categories": cats}
    js = tmp_path / "valid.json"
    js.write_text(json.dumps(ds))
    out2 = tmp_path / "r2.json"
    rc, _, err = _run([tiny_bundle, "--ytvis-json", js, "--ytvis-root", root, "-o", out2], capsys)
    assert rc == 0, err
    results2 = json.loads(out2.read_text())
    assert [r["video_id"] for r in results2][0] == 7  # sorted by id
    for vid, want in ((7, by_video[1]), (42, by_video[2])):
        got = [r for r in results2 if r["video_id"] == vid]
        assert [r["category_id"] for r in got] == [100 + 2 * (r["category_id"] - 1) for r in want]
        assert [r["segmentations"] for r in got] == [r["segmentations"] for r in want]
