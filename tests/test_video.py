"""Video input (runtime/video/) on real encoded files made by runtime/synthetic.py.

References are computed independently of the reader: the RGB frames handed to the encoder,
``np.rot90`` of an unrotated decode, a BT.601 luma formula, solid-colour image files.
"""
from __future__ import annotations

import json
import threading

import av
import numpy as np
import pytest
from PIL import Image

from dvis_trt.errors import InputError
from dvis_trt.runtime.synthetic import encode_frames, make_broken_videos, make_demo_video, render_scene
from dvis_trt.runtime.video import (Frame, load_ytvis_videos, natural_sort_key, open_source,
                                    orientation_from_display_matrix, prefetch)


def _decode_all(source):
    frames = list(source.iter_frames())
    return frames, np.stack([f.rgb for f in frames])


def _block_mean(a: np.ndarray, b: int = 4) -> np.ndarray:
    t, h, w, c = a.shape
    h2, w2 = h // b * b, w // b * b
    return a[:, :h2, :w2].astype(np.float64).reshape(t, h2 // b, b, w2 // b, b, c).mean(axis=(2, 4))


# ------------------------------------------------------------------------------------------
# decoding, sizes, pixel formats
# ------------------------------------------------------------------------------------------

def test_odd_size_333x501_roundtrip(tmp_path):
    demo = make_demo_video(tmp_path / "odd.mp4", num_frames=3, size=(333, 501), fps=10)
    src = open_source(demo.path)
    assert src.size == (333, 501) and src.num_frames == 3 and src.fps == pytest.approx(10.0)
    assert src.pix_fmt == "yuv444p" and src.name == "odd"
    frames, rgb = _decode_all(src)
    assert [f.index for f in frames] == [0, 1, 2]
    assert [f.pts_seconds for f in frames] == pytest.approx([0.0, 0.1, 0.2])
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 333, 501, 3)
    assert all(f.rgb.flags.c_contiguous for f in frames)
    # lossless x264 in YUV 4:4:4; the only loss is swscale's 8-bit RGB->YUV->RGB round trip
    # (BT.601 limited range quantises each channel to ~219 levels): at most 2 levels.
    assert np.abs(rgb.astype(int) - demo.frames.astype(int)).max() <= 2


def test_source_is_reiterable_and_one_frame_clip(tmp_path):
    demo = make_demo_video(tmp_path / "one.mkv", num_frames=1, size=(17, 23), codec="ffv1",
                           pix_fmt="bgr0")
    src = open_source(demo.path)
    a = [f.rgb for f in src.iter_frames()]
    b = [f.rgb for f in src]
    assert len(a) == len(b) == 1
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], demo.frames[0])  # ffv1 RGB is lossless: exact


def test_gray_input(tmp_path):
    frames, _, _ = render_scene(2, (31, 45), seed=5)
    path = encode_frames(tmp_path / "gray.mkv", frames, codec="ffv1", pix_fmt="gray")
    src = open_source(path)
    assert src.pix_fmt == "gray"
    _, rgb = _decode_all(src)
    assert rgb.shape == (2, 31, 45, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    f = frames.astype(np.float64)
    luma = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    # gray is full-range luma: only 8-bit rounding on the way in and out (<= 1 level)
    assert np.abs(rgb[..., 0] - luma).max() <= 1.0


@pytest.mark.parametrize("codec,pix_fmt,ext", [
    ("libx264", "yuv422p", "mp4"),
    ("libx264", "yuv420p", "mp4"),
    ("libx264", "yuv420p10le", "mp4"),
    ("ffv1", "yuv422p10le", "mkv"),
    ("libvpx-vp9", "yuv420p", "webm"),
    ("libx265", "yuv420p", "mkv"),
    ("libsvtav1", "yuv420p", "mp4"),
    ("mpeg4", "yuv420p", "avi"),
    ("mjpeg", "yuvj422p", "avi"),   # full-range ("JPEG") YUV
])
def test_subsampled_and_high_bit_depth_formats(tmp_path, codec, pix_fmt, ext):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this FFmpeg build")
    frames, _, _ = render_scene(2, (48, 64), seed=3)
    path = encode_frames(tmp_path / f"v.{ext}", frames, codec=codec, pix_fmt=pix_fmt)
    src = open_source(path)
    assert src.pix_fmt == pix_fmt and src.size == (48, 64)
    _, rgb = _decode_all(src)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 48, 64, 3)
    # Chroma subsampling loses colour at the textures' sharp edges (single pixels can be off
    # by >100), so compare 4x4 block means: measured <= 2.2 mean error for every format here;
    # a wrong matrix, range (limited vs full: ~16% contrast) or swapped channels gives > 8.
    err = np.abs(_block_mean(rgb) - _block_mean(frames))
    assert err.mean() < 3.5
    chan = np.abs(rgb.reshape(-1, 3).mean(0) - frames.reshape(-1, 3).astype(float).mean(0))
    assert chan.max() < 3.0


def test_even_only_codec_refuses_odd_size(tmp_path):
    frames, _, _ = render_scene(1, (33, 51))
    with pytest.raises(ValueError, match="yuv444p"):
        encode_frames(tmp_path / "x.mp4", frames, codec="libx264", pix_fmt="yuv420p")
    assert list(tmp_path.iterdir()) == []  # atomic: nothing left behind


# ------------------------------------------------------------------------------------------
# rotation metadata
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_rotation_display_matrix(tmp_path, rotate):
    frames, _, _ = render_scene(2, (21, 34), seed=2)
    plain = encode_frames(tmp_path / "plain.mp4", frames)
    turned = encode_frames(tmp_path / f"r{rotate}.mp4", frames, rotate=rotate)
    src_plain, src_rot = open_source(plain), open_source(turned)
    _, a = _decode_all(src_plain)
    _, b = _decode_all(src_rot)
    # `rotate` = degrees a player turns the stored picture clockwise; np.rot90 with k<0 turns
    # clockwise. Same encoder input and settings -> identical decoded pixels before rotation.
    expected = np.rot90(a, k=-rotate // 90, axes=(1, 2))
    assert src_rot.size == expected.shape[1:3]
    assert b.shape == expected.shape
    np.testing.assert_array_equal(b, expected)


def test_phone_portrait_clip_comes_out_portrait(tmp_path):
    # stored landscape (H=18, W=32) with "rotate 90": must come out 32x18 (portrait)
    demo = make_demo_video(tmp_path / "phone.mov", num_frames=2, size=(18, 32), rotate=90)
    src = open_source(demo.path)
    assert src.stored_size == (18, 32) and src.size == (32, 18)
    _, rgb = _decode_all(src)
    assert rgb.shape == (2, 32, 18, 3)
    # top-left of the upright picture is the stored bottom-left (clockwise turn)
    assert np.abs(rgb.astype(int) - demo.displayed_frames().astype(int)).max() <= 2
    assert np.abs(rgb[:, 0, 0].astype(int) - demo.frames[:, -1, 0].astype(int)).max() <= 2


def test_rotation_legacy_tag_and_mirror(tmp_path):
    frames, _, _ = render_scene(1, (20, 30), seed=4)
    plain = _decode_all(open_source(encode_frames(tmp_path / "p.mkv", frames)))[1]
    tagged = encode_frames(tmp_path / "tag.mkv", frames, rotate=90, rotate_as_tag=True)
    with av.open(str(tagged)) as c:  # really a tag, no display matrix
        assert {k.lower(): v for k, v in c.streams.video[0].metadata.items()}["rotate"] == "90"
    np.testing.assert_array_equal(_decode_all(open_source(tagged))[1],
                                  np.rot90(plain, k=-1, axes=(1, 2)))
    # a display matrix with a mirror: PyAV's set_display_rotation(0, hflip=True)
    path = tmp_path / "mirror.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt, s.options = 30, 20, "yuv444p", {"qp": "0"}
        s.set_display_rotation(0, hflip=True)
        for p in s.encode(av.VideoFrame.from_ndarray(frames[0], format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    mirrored = _decode_all(open_source(path))[1]
    np.testing.assert_array_equal(mirrored, _decode_all(open_source(tmp_path / "p.mkv"))[1][:, :, ::-1])


def test_display_matrix_orientation_table():
    one = 1 << 16
    img = np.arange(6).reshape(2, 3)
    # FFmpeg av_display_rotation_set(m, -90) (i.e. +90 counter-clockwise):
    # m = [cos, -sin, 0, sin, cos, 0, 0, 0, 1<<30] with angle 90 deg ccw -> [0, -1, 1, 0]
    o = orientation_from_display_matrix([0, -one, 0, one, 0, 0, 0, 0, 1 << 30])
    np.testing.assert_array_equal(o.apply(img), np.rot90(img, 1))
    o = orientation_from_display_matrix([0, one, 0, -one, 0, 0, 0, 0, 1 << 30])
    np.testing.assert_array_equal(o.apply(img), np.rot90(img, -1))
    o = orientation_from_display_matrix([-one, 0, 0, 0, -one, 0, 0, 0, 1 << 30])
    np.testing.assert_array_equal(o.apply(img), np.rot90(img, 2))
    o = orientation_from_display_matrix([one, 0, 0, 0, one, 0, 0, 0, 1 << 30])
    assert o.is_identity


# ------------------------------------------------------------------------------------------
# broken inputs
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return make_broken_videos(tmp_path_factory.mktemp("broken"))


def _read_error(path, **kw):
    frames = []
    with pytest.raises(InputError) as info:
        src = open_source(path, **kw)
        for f in src.iter_frames():
            frames.append(f.index)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg, frames


@pytest.mark.parametrize("name,pattern", [
    ("empty", "empty file"),
    ("not_video", "cannot open"),
    ("no_frames", "no decodable video frames"),
    ("audio_only", "no video stream"),
])
def test_unreadable_files(broken, name, pattern):
    msg, frames = _read_error(broken[name])
    assert pattern in msg and frames == []


def test_truncated_and_corrupt_files_name_the_frame(broken):
    msg, frames = _read_error(broken["truncated"])
    assert "truncated or corrupt" in msg and f"at frame {len(frames)}" in msg
    assert "20 frames" in msg and 0 < len(frames) < 20
    msg, frames = _read_error(broken["truncated_mkv"])   # no frame count: duration check
    assert f"at frame {len(frames)}" in msg and 0 < len(frames) < 20
    msg, frames = _read_error(broken["corrupt"])
    assert f"at frame {len(frames)}" in msg and 0 < len(frames) < 20
    assert frames == list(range(len(frames)))


def test_lenient_mode_decodes_through_damage(broken):
    n_strict = len(_read_error(broken["corrupt"])[1])
    n = sum(1 for _ in open_source(broken["corrupt"], strict=False).iter_frames())
    assert n > n_strict


def test_missing_paths_and_json(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_source(tmp_path / "nope.mp4")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(InputError, match="--ytvis-json"):
        open_source(tmp_path / "a.json")


# ------------------------------------------------------------------------------------------
# frame folders and YouTube-VIS json
# ------------------------------------------------------------------------------------------

def _color(i: int):
    return (10 * i % 256, 255 - 10 * i % 256, (37 * i) % 256)


def _write_frames(folder, names, size=(12, 16), fmt="JPEG"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in names:
        Image.new("RGB", (size[1], size[0]), _color(i)).save(folder / n, fmt, quality=100)


def test_frame_folder_natural_order(tmp_path):
    folder = tmp_path / "JPEGImages" / "vid1"
    names = [(i, f"{i:05d}.jpg") for i in [0, 5, 9, 10, 11, 100]]
    _write_frames(folder, names)
    (folder / "notes.txt").write_text("not a frame")
    (folder / "._00001.jpg").write_bytes(b"resource fork junk")
    src = open_source(folder, fps=5)
    assert src.name == "vid1" and src.num_frames == 6 and src.size == (12, 16)
    frames, rgb = _decode_all(src)
    assert [f.pts_seconds for f in frames] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # flat-colour JPEG at quality 100: within 3 levels of the colour written
    for k, (i, _) in enumerate(names):
        assert np.abs(rgb[k].reshape(-1, 3).astype(int) - np.array(_color(i))).max() <= 3
    # unpadded names: numeric order, not string order
    loose = tmp_path / "loose"
    _write_frames(loose, [(i, f"f{i}.png") for i in [10, 9, 1]], fmt="PNG")
    got = [tuple(f.rgb[0, 0]) for f in open_source(loose).iter_frames()]
    assert got == [_color(1), _color(9), _color(10)]
    assert sorted(["b10", "b9", "a"], key=natural_sort_key) == ["a", "b9", "b10"]


def test_frame_folder_errors_and_exif(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no image files"):
        open_source(empty)
    (empty / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="no image files"):
        open_source(empty)
    mixed = tmp_path / "mixed"
    _write_frames(mixed, [(0, "0.png")], size=(12, 16), fmt="PNG")
    _write_frames(mixed, [(1, "1.png")], size=(12, 18), fmt="PNG")
    with pytest.raises(InputError, match="one size"):
        list(open_source(mixed).iter_frames())
    # EXIF orientation 6 = rotate 90 cw to display (detectron2 read_image applies it)
    ex = tmp_path / "exif"
    ex.mkdir()
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[0, 0] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(ex / "0.png", exif=exif.tobytes())
    out = next(open_source(ex).iter_frames()).rgb
    np.testing.assert_array_equal(out, np.rot90(arr, -1))


def test_ytvis_json(tmp_path):
    root = tmp_path / "JPEGImages"
    _write_frames(root / "bbb", [(i, f"{i:05d}.jpg") for i in (0, 5)])
    _write_frames(root / "aaa", [(i, f"{i:05d}.jpg") for i in (0, 5, 10)])
    ann = {"videos": [
        {"id": 7, "file_names": ["bbb/00000.jpg", "bbb/00005.jpg"], "height": 12, "width": 16,
         "length": 2},
        {"id": 3, "file_names": ["aaa/00000.jpg", "aaa/00005.jpg", "aaa/00010.jpg"],
         "height": 12, "width": 16, "length": 3}],
        "categories": [{"id": 1, "name": "person"}]}
    jpath = tmp_path / "valid.json"
    jpath.write_text(json.dumps(ann))
    videos = load_ytvis_videos(jpath, root)
    assert [(v.id, v.name, v.length) for v in videos] == [(3, "aaa", 3), (7, "bbb", 2)]
    assert videos[0].file_names[2] == root / "aaa" / "00010.jpg"
    src = videos[1].open()
    assert src.video_id == 7 and src.num_frames == 2 and src.size == (12, 16)
    assert len(list(src.iter_frames())) == 2
    # wrong size in the json, missing frame, not a YouTube-VIS json
    ann["videos"][0]["height"] = 99
    ann["videos"][1]["file_names"][2] = "aaa/00015.jpg"
    jpath.write_text(json.dumps(ann))
    v3, v7 = load_ytvis_videos(jpath, root)
    with pytest.raises(InputError, match="dataset says 99x16"):
        v7.open()
    with pytest.raises(InputError, match="missing"):
        v3.open()
    jpath.write_text(json.dumps({"images": []}))
    with pytest.raises(InputError, match="no 'videos' list"):
        load_ytvis_videos(jpath, root)
    with pytest.raises(InputError, match="--ytvis-root"):
        load_ytvis_videos(jpath, tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# prefetch
# ------------------------------------------------------------------------------------------

class _CountingSource:
    """An endless source that records how far ahead of the consumer the decoder got."""

    def __init__(self, limit=None):
        self.produced = 0
        self.consumed = 0
        self.max_ahead = 0
        self.closed = threading.Event()
        self.limit = limit
        self.lock = threading.Lock()

    def iter_frames(self):
        try:
            i = 0
            while self.limit is None or i < self.limit:
                with self.lock:
                    self.produced += 1
                    self.max_ahead = max(self.max_ahead, self.produced - self.consumed)
                yield Frame(i, None, np.zeros((2, 2, 3), np.uint8))
                i += 1
        finally:
            self.closed.set()


def test_prefetch_is_bounded_and_closes_on_early_exit():
    src = _CountingSource()
    max_queue = 3
    with prefetch(src, max_queue=max_queue) as frames:
        for f in frames:
            with src.lock:
                src.consumed += 1
            if f.index == 40:
                break
        # let the decoder run ahead as far as it can, then check the bound holds
        for _ in range(200):
            if src.produced >= src.consumed + max_queue + 1:
                break
            threading.Event().wait(0.005)
    assert not frames.alive and src.closed.is_set()
    # queue slots + the frame the producer holds while blocked + the one being handed over
    assert src.max_ahead <= max_queue + 2
    assert src.produced <= 41 + max_queue + 2


def test_prefetch_matches_direct_decode_and_raises_decode_errors(tmp_path, broken):
    demo = make_demo_video(tmp_path / "d.mp4", num_frames=5, size=(16, 20))
    src = open_source(demo.path)
    direct = [(f.index, f.pts_seconds, f.rgb) for f in src.iter_frames()]
    fetched = [(f.index, f.pts_seconds, f.rgb) for f in prefetch(src, max_queue=2)]
    assert [d[:2] for d in direct] == [d[:2] for d in fetched]
    for d, p in zip(direct, fetched):
        np.testing.assert_array_equal(d[2], p[2])
    got = []
    frames = prefetch(open_source(broken["corrupt"]), max_queue=2)
    with pytest.raises(InputError, match="at frame"):
        for f in frames:
            got.append(f.index)
    assert got == list(range(len(got))) and len(got) > 0
    assert not frames.alive
    with pytest.raises(ValueError):
        prefetch(src, max_queue=0)


# ------------------------------------------------------------------------------------------
# timestamps and healthy files that must not be called truncated
# ------------------------------------------------------------------------------------------

def test_variable_frame_rate_timestamps_kept(tmp_path):
    frames, _, _ = render_scene(6, (16, 24), seed=1)
    pts_ms = [0, 40, 200, 230, 700, 1000]
    path = tmp_path / "vfr.mkv"
    tb = __import__("fractions").Fraction(1, 1000)
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=25)
        s.width, s.height, s.pix_fmt = 24, 16, "bgr0"
        s.time_base = tb
        s.codec_context.time_base = tb
        for t, p in enumerate(pts_ms):
            fr = av.VideoFrame.from_ndarray(frames[t], format="rgb24")
            fr.pts, fr.time_base = p, tb
            for pkt in s.encode(fr):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    got = list(open_source(path).iter_frames())
    assert [f.pts_seconds for f in got] == pytest.approx([p / 1000 for p in pts_ms])
    assert [f.index for f in got] == list(range(6))


def test_audio_longer_than_video_is_not_truncation(tmp_path):
    frames, _, _ = render_scene(10, (16, 24), seed=1)
    path = tmp_path / "av.mkv"
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = 24, 16, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        for t in range(10):
            for p in v.encode(av.VideoFrame.from_ndarray(frames[t], format="rgb24")):
                c.mux(p)
        for k in range(47):  # 3 s of audio next to 1 s of video
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                            layout="mono")
            fr.sample_rate, fr.pts = 16000, k * 1024
            for p in a.encode(fr):
                c.mux(p)
        for s in (v, a):
            for p in s.encode():
                c.mux(p)
    assert len(list(open_source(path).iter_frames())) == 10
