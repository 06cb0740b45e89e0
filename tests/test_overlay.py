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
    # 61x83 has odd sides: yuv420p needs even ones, one replicated row/column is added
    assert len(frames) == 6 and dec.size == (62, 84) and dec.codec == "h264"
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
    # the padding row/column replicates the last one
    assert np.abs(np.stack(frames)[:, 61].astype(int) - np.stack(frames)[:, 60]).mean() < 6
    # same picture from YouTube-VIS result dicts (RLE, 1-based category ids)
    out2 = tmp_path / "overlay2.mp4"
    write_overlay(out2, (f.rgb for f in src.iter_frames()), ytvis_results(1, insts),
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
