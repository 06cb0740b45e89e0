"""Overlay videos (runtime/overlay.py): blending checked against a direct formula, the encoded
file decoded back with PyAV."""
from __future__ import annotations

import av
import numpy as np
import pytest

from dvis_trt.runtime import overlay as overlay_mod
from dvis_trt.runtime.overlay import render_overlay_frame, track_color, write_overlay
from dvis_trt.runtime.results import InstanceTrack, ytvis_results
from dvis_trt.runtime.synthetic import make_demo_video
from dvis_trt.runtime.video import open_source


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_video(tmp_path_factory.mktemp("ov") / "demo.mp4", num_frames=6,
                           size=(61, 83), seed=1, num_objects=3)


def _interior(mask):
    """Mask pixels whose 4 neighbours are inside too (away from the drawn outline)."""
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    m[0] = m[-1] = False
    m[:, 0] = m[:, -1] = False
    return m


def test_blend_matches_formula(demo):
    rgb = demo.frames[3]
    masks = [demo.masks[3, i] for i in range(demo.masks.shape[1])]
    colors = [np.array(track_color(i + 1), np.float32) for i in range(len(masks))]
    out = render_overlay_frame(rgb, masks, colors, [""] * len(masks), alpha=0.5)  # no labels
    for m, c in zip(masks, colors):
        inner = _interior(m)
        if not inner.any():
            continue
        expected = np.rint(rgb[inner].astype(np.float64) * 0.5 + c.astype(np.float64) * 0.5)
        # float32 blend then rint: equal up to a half-level tie -> at most 1 level
        assert np.abs(out[inner].astype(int) - expected.astype(int)).max() <= 1
    untouched = ~np.logical_or.reduce(masks)
    np.testing.assert_array_equal(out[untouched], rgb[untouched])
    # the outline is drawn in the solid colour
    m, c = masks[0], colors[0]
    edge = m & ~_interior(m)
    if edge.any():
        np.testing.assert_array_equal(out[edge], np.broadcast_to(c.astype(np.uint8), (edge.sum(), 3)))


def test_labels_are_drawn(demo):
    rgb = demo.frames[3]
    m = demo.masks[3, 1]
    assert m.any()
    color = np.array(track_color(7), np.float32)
    with_text = render_overlay_frame(rgb, [m], [color], ["#7 person 0.93"])
    without = render_overlay_frame(rgb, [m], [color], [""])
    diff = np.any(with_text != without, axis=-1)
    assert diff.sum() > 30  # the text and its box changed pixels
    rows = np.flatnonzero(m.any(axis=1))
    # the label sits above the mask's top row (or at it when there is no room above)
    assert np.flatnonzero(diff.any(axis=1))[0] <= max(rows[0], 0) + 1


def test_write_overlay_decodes_back(tmp_path, demo):
    src = open_source(demo.path)
    insts = [InstanceTrack(track_id=i + 1, label=i, score=0.9 - 0.2 * i, masks=demo.masks[:, i])
             for i in range(demo.masks.shape[1])]
    out = tmp_path / "overlay.mp4"
    n = write_overlay(out, src.iter_frames(), insts, ["person", "dog", "cat"], fps=src.fps)
    assert n == 6
    dec = open_source(out)
    frames = [f.rgb for f in dec.iter_frames()]
    # 61x83 has odd sides: exactly that size (yuv444p, as 4:2:0 cannot hold odd sides)
    assert len(frames) == 6 and dec.size == (61, 83) and dec.codec == "h264"
    assert dec.fps == pytest.approx(10.0)
    # the picture inside the original area is the overlay we rendered (lossy H.264: compare
    # means; masks tinted 50% towards saturated colours differ from the input by ~40 levels)
    ref = np.stack([render_overlay_frame(demo.frames[t], [i.masks[t] for i in insts],
                                         [np.array(track_color(i.track_id), np.float32)
                                          for i in insts],
                                         [f"#{i.track_id} {nm} {i.score:.2f}" for i, nm
                                          in zip(insts, ["person", "dog", "cat"])])
                    for t in range(6)])
    got = np.stack(frames)[:, :61, :83]
    # H.264 4:2:0 at crf 20 blurs the fine stripes and text of a tiny clip (per-pixel errors
    # ~10), so compare 4x4 block means: measured ~4 vs the rendered overlay, ~26 vs the
    # untinted input (the tint moves masked pixels ~40 levels)
    def blocks(a):
        a = a[:, :60, :80].astype(np.float64)
        return a.reshape(6, 15, 4, 20, 4, 3).mean(axis=(2, 4))
    err_ref = np.abs(blocks(got) - blocks(ref)).mean()
    assert err_ref < 7.0
    assert np.abs(blocks(got) - blocks(demo.frames)).mean() > 3 * err_ref
    # same picture from YouTube-VIS result dicts (RLE, 1-based category ids)
    out2 = tmp_path / "overlay2.mp4"
    write_overlay(out2, src.iter_frames(), ytvis_results(1, insts),
                  ["person", "dog", "cat"], fps=src.fps)
    frames2 = np.stack([f.rgb for f in open_source(out2).iter_frames()])
    np.testing.assert_array_equal(frames2, np.stack(frames))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.mp4", "overlay2.mp4"]


def test_mpeg4_fallback_and_errors(tmp_path, demo, monkeypatch):
    monkeypatch.setattr(overlay_mod, "_pick_encoder",
                        lambda suffix: ("mpeg4", "yuv420p", {"qmin": "2", "qmax": "8"}))
    src = open_source(demo.path)
    out = tmp_path / "fallback.avi"
    assert write_overlay(out, src.iter_frames(), [], None, fps=5) == 6
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
        assert sum(1 for _ in c.decode(video=0)) == 6
    # errors leave no file: no frames, masks of the wrong size, too few mask frames
    with pytest.raises(ValueError, match="no frames"):
        write_overlay(tmp_path / "none.mp4", iter([]), [], None, fps=5)
    bad = [InstanceTrack(1, 0, 0.5, masks=np.zeros((6, 10, 10), bool))]
    bad[0].masks[:, 2:5, 2:5] = True
    with pytest.raises(ValueError, match="10x10"):
        write_overlay(tmp_path / "bad.mp4", src.iter_frames(), bad, None, fps=5)
    short = [InstanceTrack(1, 0, 0.5, masks=demo.masks[:2, 0])]
    with pytest.raises(ValueError, match="2 frames"):
        write_overlay(tmp_path / "short.mp4", src.iter_frames(), short, None, fps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fallback.avi"]


# ---------------------------------------------------------------------------------------------
# labels a person can read (issue 13): placement, ids, font, size, timestamps, contact sheet
# ---------------------------------------------------------------------------------------------
def _touching_scene(h, w, n=8):
    """n discs in a row, each touching the next, plus a wide ellipse touching them from below."""
    from scipy import ndimage  # noqa: F401 - imported here to fail early if scipy is missing
    yy, xx = np.mgrid[:h, :w]
    r = min(h, w) // 12
    x0 = w // 2 - (n - 1) * r
    masks = [(xx - (x0 + 2 * r * k)) ** 2 + (yy - h // 2) ** 2 <= r * r for k in range(n)]
    masks.append((xx - w // 2) ** 2 / 9.0 + (yy - h // 2 - 2 * r) ** 2 <= r * r)
    return masks


@pytest.mark.parametrize("h,w", [(360, 640), (2160, 3840), (61, 83)])
def test_touching_objects_get_separate_labels_near_their_masks(h, w):
    from scipy import ndimage
    from dvis_trt.runtime.overlay import font_size_for, place_labels

    masks = _touching_scene(h, w, n=8 if w > 100 else 3)
    colors = [np.array(track_color(i + 1), np.float32) for i in range(len(masks))]
    texts = [f"#{i + 1} giant_panda 0.{90 + i}" if w > 100 else f"#{i + 1}"
             for i in range(len(masks))]
    rgb = np.full((h, w, 3), 80, np.uint8)
    layout = []
    out = render_overlay_frame(rgb, masks, colors, texts, layout=layout)
    assert out.shape == rgb.shape
    assert sorted(p.index for p in layout) == list(range(len(masks)))  # every label placed
    lh = layout[0].box[3] - layout[0].box[1]
    max_leader = max(40.0, 4.0 * lh)  # place_labels' default
    assert lh >= font_size_for(h, w)   # the box holds the scaled font
    for a in layout:
        x0, y0, x1, y1 = a.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # distance from the box to its mask, measured independently (Euclidean distance map
        # of a window around the box: a mask pixel outside it is farther than max_leader)
        m = int(max_leader) + 2
        wy0, wx0 = max(0, y0 - m), max(0, x0 - m)
        window = ~masks[a.index][wy0:y1 + m, wx0:x1 + m]
        edt = ndimage.distance_transform_edt(window) if not window.all() else \
            np.full(window.shape, np.inf)
        dist = edt[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0].min()
        assert dist <= max_leader + 1, (a, dist)
        assert abs(dist - a.distance) <= 1.5
        # a label away from its mask is tied to it by a leader line in its colour
        if a.leader:
            ax, ay = a.anchor
            assert masks[a.index][ay, ax]
            assert np.abs(out[ay, ax].astype(int) - colors[a.index].astype(int)).max() <= 1
        for b in layout:
            if b is not a:
                bx0, by0, bx1, by1 = b.box
                assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0, (a, b)
    # without room to spare a label may go further but never on top of another one
    crowded = place_labels(masks, [(w // 2, lh)] * len(masks), (h, w))
    boxes = [p.box for p in crowded]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_ids_as_the_user_sees_them_and_font_scale():
    from dvis_trt.runtime.overlay import FILL_ID_BASE, display_id, font_size_for
    assert display_id(14) == "#14"
    assert display_id(FILL_ID_BASE + 7) == "f7"          # frame-link instance of the first clip
    assert display_id(2 * FILL_ID_BASE + 3) == "f2.3"    # ... of the second clip
    assert font_size_for(360, 640) == 12 and font_size_for(2160, 3840) == 72
    assert font_size_for(1080, 1920) == 36 and font_size_for(640, 360) == 12  # portrait


def _vfr_video(path, stamps, size):
    import fractions
    h, w = size
    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        s.codec_context.time_base = tb
        for k, t in enumerate(stamps):
            img = np.zeros((h, w, 3), np.uint8)
            img[:, : (k + 1) * w // len(stamps)] = 200
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = int(round(t * 1000)), tb
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_odd_size_and_variable_frame_rate_are_kept(tmp_path):
    stamps = [0.0, 0.04, 0.1, 0.3, 0.34, 0.5, 0.9]
    src_path = tmp_path / "vfr.mp4"
    _vfr_video(src_path, stamps, (45, 77))
    src = open_source(src_path)
    got_in = [f.pts_seconds for f in src.iter_frames()]
    np.testing.assert_allclose(got_in, stamps, atol=1e-3)
    m = np.zeros((len(stamps), 45, 77), bool)
    m[:, 10:30, 20:50] = True
    out = tmp_path / "ov.mp4"
    write_overlay(out, src.iter_frames(), [InstanceTrack(3, 0, 0.9, masks=m)], ["cat"])
    dec = open_source(out)
    assert dec.size == (45, 77)
    frames = list(dec.iter_frames())
    assert [f.rgb.shape for f in frames] == [(45, 77, 3)] * len(stamps)
    np.testing.assert_allclose([f.pts_seconds - frames[0].pts_seconds for f in frames], stamps,
                               atol=2e-3)


def test_contact_sheet(tmp_path, demo):
    from PIL import Image
    from dvis_trt.runtime.overlay import write_contact_sheet
    src = open_source(demo.path)
    insts = [InstanceTrack(track_id=i + 1, label=i, score=0.9, masks=demo.masks[:, i])
             for i in range(demo.masks.shape[1])]
    out = tmp_path / "sheet.png"
    shown = write_contact_sheet(out, src.iter_frames(), insts, ["a", "b", "c"], num=4)
    assert shown == [0, 2, 3, 5]
    img = Image.open(out)
    # 2 x 2 tiles of 83 px (never upscaled) with 4 px borders
    assert img.width == 2 * 83 + 3 * 4 and img.height > 2 * 61
    with pytest.raises(ValueError, match="at least 1"):
        write_contact_sheet(tmp_path / "x.png", src.iter_frames(), insts, num=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]
