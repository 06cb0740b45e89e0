"""Overlay video and contact sheet: each instance's mask tinted in its colour, with a label a
person can read.

Drawing (:func:`render_overlay_frame`):

* **masks** are blended with alpha ``0.5`` in a colour fixed by the track id
  (:func:`track_color`) and outlined in that colour, the outline thickness scaled with the
  frame (1 px at 360p, 6 px at 4K).
* **labels** ``<id> <class> <score>`` sit in a box filled with the instance's colour, beside
  the object: :func:`place_labels` tries positions around the mask (above first, then below,
  beside, further out) and keeps, per label in score order, the cheapest one that overlaps no
  label placed before it, stays inside the frame and lies within ``max_leader`` pixels of the
  mask, preferring positions that cover no mask. A label that does not touch its mask gets a
  **leader line** in the instance's colour from the box to the nearest mask pixel (with a dot
  there). Labels that fit nowhere near their mask go anywhere free with a longer leader line;
  only a frame with no free room left drops a label.
* the **font** (Pillow's scalable default) is ``max(12, short side / 30)`` pixels: 12 px at
  360p, 36 px at 1080p, 72 px at 4K.
* **ids** are what the user sees as one scheme (:func:`display_id`): tracked instances show
  their track id ``#14``; instances the refiner added from the frame-linked segmenter queries
  (no track: ids ``FILL_ID_BASE * (clip + 1) + j`` in the results) show ``f<j>`` (``f<clip>.<j>``
  after the first clip). The run's summary line says what ``f`` means.

Encoding (:func:`write_overlay`): PyAV, ``libx264`` (``libvpx-vp9`` for ``.webm``, ``mpeg4``
when this FFmpeg has no x264). The output has **exactly the input's size**: even sizes are
``yuv420p`` (plays everywhere); odd sizes, which 4:2:0 cannot hold, are ``yuv444p`` (H.264
High 4:4:4 / VP9 profile 1; FFmpeg, VLC, mpv and Chrome play it, some hardware players do not;
the mpeg4 fallback pads one replicated row/column instead). **Timestamps** are the source's
(``Frame.pts_seconds``, variable frame rate kept, re-based so the first frame is at 0), in a
1/90000 s time base (1/60000 for mpeg4, whose clock stops at 65535 Hz); arrays without timestamps get ``index / fps``.

:func:`write_contact_sheet` renders N evenly spaced frames into one PNG grid, captioned with
frame index and time, for a look without a video player. Files are written atomically.
"""
from __future__ import annotations

import colorsys
import fractions
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .pipeline import FILL_ID_BASE
from dvis_trt.fileio import atomic_output

from .results import InstanceTrack, decode_rle

__all__ = ["track_color", "display_id", "font_size_for", "LabelPlacement", "place_labels",
           "render_overlay_frame", "write_overlay", "write_contact_sheet", "FILL_ID_BASE",
           "TIME_BASE"]

PathLike = Union[str, "os.PathLike[str]"]

#: time base of the overlay's timestamps (the MPEG 90 kHz clock)
TIME_BASE = fractions.Fraction(1, 90000)


def track_color(track_id: int) -> Tuple[int, int, int]:
    """A saturated RGB colour per track id (golden-ratio hue steps; deterministic)."""
    hue = (int(track_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def display_id(track_id: int) -> str:
    """The id a person sees: ``#14`` for a track, ``f3`` / ``f2.3`` for a frame-link instance.

    Frame-link (fill) instances carry ids ``FILL_ID_BASE * (clip + 1) + j`` (``j >= 1``,
    :data:`dvis_trt.runtime.pipeline.FILL_ID_BASE`); they were never tracked, so they get their
    own visible scheme instead of a second, seven-digit range of "track" ids.
    """
    tid = int(track_id)
    if tid < FILL_ID_BASE:
        return f"#{tid}"
    clip, j = divmod(tid, FILL_ID_BASE)
    return f"f{j}" if clip == 1 else f"f{clip}.{j}"


def font_size_for(height: int, width: Optional[int] = None) -> int:
    """Label font size in pixels: ``max(12, short side / 30)`` (12 at 360p, 72 at 2160p)."""
    short = min(int(height), int(width)) if width else int(height)
    return max(12, int(round(short / 30)))


def _font(height: int, width: Optional[int] = None):
    from PIL import ImageFont

    size = font_size_for(height, width)
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (needs FreeType)
    except (TypeError, OSError):  # pragma: no cover - old Pillow / no FreeType: fixed 10 px
        return ImageFont.load_default()


class _OverlayInstance:
    """Uniform view over InstanceTrack objects and YouTube-VIS result dicts."""

    def __init__(self, inst: Union[InstanceTrack, Mapping[str, Any]], class_names, k: int):
        if isinstance(inst, InstanceTrack):
            self.track_id = int(inst.track_id)
            label = int(inst.label)
            self.score = float(inst.score)
            self._masks = None if inst.masks is None else inst.masks
            self._segs = inst.segmentations
        else:  # YouTube-VIS result dict: category_id is 1-based
            self.track_id = int(inst.get("track_id", k))
            label = int(inst["category_id"]) - 1
            self.score = float(inst["score"])
            self._masks = inst.get("masks")
            self._segs = inst.get("segmentations")
        if self._masks is None and self._segs is None:
            raise ValueError(f"instance {k} has neither masks nor segmentations")
        if class_names and 0 <= label < len(class_names):
            name = str(class_names[label])
        else:
            name = f"class {label + 1}"
        self.text = f"{display_id(self.track_id)} {name} {self.score:.2f}"
        self.color = np.array(track_color(self.track_id), np.float32)
        self.num_frames = len(self._masks) if self._masks is not None else len(self._segs)

    def mask(self, t: int) -> Optional[np.ndarray]:
        if t >= self.num_frames:
            raise ValueError(f"track {self.track_id} has masks for {self.num_frames} frames, "
                             f"but frame {t} was given")
        if self._masks is not None:
            return np.asarray(self._masks[t]) != 0
        seg = self._segs[t]
        if seg is None:
            return None
        return decode_rle([seg])[0]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return mask & ~inner


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by ``r`` pixels (shifted ORs; ``r`` is small)."""
    out = mask.copy()
    for _ in range(int(r)):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


# ----------------------------------------------------------------------------------------------
# label placement
# ----------------------------------------------------------------------------------------------
@dataclass
class LabelPlacement:
    """Where one label went.

    Attributes:
        index: the instance's position in the lists given to :func:`place_labels`.
        box: ``(x0, y0, x1, y1)`` pixel box of the label (x1, y1 exclusive).
        anchor: ``(x, y)`` mask pixel nearest to the box (where a leader line ends).
        distance: pixels from the box to that mask pixel (0 when the box touches the mask).
        leader: whether a leader line is drawn (``distance`` above the small gap).
    """

    index: int
    box: Tuple[int, int, int, int]
    anchor: Tuple[int, int]
    distance: float
    leader: bool


def _rect_point_distance(x0, y0, x1, y1, px, py):
    """Distance from box(es) to point(s) (0 inside), broadcasting."""
    dx = np.maximum(np.maximum(x0 - px, px - (x1 - 1)), 0)
    dy = np.maximum(np.maximum(y0 - py, py - (y1 - 1)), 0)
    return np.hypot(dx, dy)


def place_labels(masks: Sequence[Optional[np.ndarray]], sizes: Sequence[Optional[Tuple[int, int]]],
                 frame_hw: Tuple[int, int], *, gap: int = 3,
                 max_leader: Optional[float] = None,
                 order: Optional[Sequence[int]] = None) -> List[LabelPlacement]:
    """Place label boxes beside their masks without overlapping each other.

    Args:
        masks: per instance bool (H, W) or None (no label for it).
        sizes: per instance label box ``(width, height)`` in pixels, or None (no label).
        frame_hw: ``(H, W)``.
        gap: pixels kept between a label and its mask's bounding box; a box within
            ``2 * gap + 1`` of its mask gets no leader line.
        max_leader: longest leader line for a "near" placement, pixels (default: 4 label heights
            of the first label, at least 40).
        order: instances in placement priority (default: given order; pass descending score).
    Returns:
        one :class:`LabelPlacement` per placed label, in placement order. Boxes are inside the
        frame and never overlap; a label is only missing when no free spot is left anywhere.
    """
    H, W = int(frame_hw[0]), int(frame_hw[1])
    idx = list(order) if order is not None else list(range(len(masks)))
    todo = [i for i in idx if masks[i] is not None and sizes[i] is not None and masks[i].any()]
    if not todo:
        return []
    lh = max(int(sizes[todo[0]][1]), 1)
    if max_leader is None:
        max_leader = max(40.0, 4.0 * lh)
    union = np.zeros((H, W), bool)
    for i in todo:
        union |= masks[i]
    integral = np.zeros((H + 1, W + 1), np.int32)  # < 2**31 pixels per frame
    np.cumsum(union, axis=0, dtype=np.int32, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    placed: List[LabelPlacement] = []
    boxes = np.zeros((0, 4), np.int64)
    for i in todo:
        m = masks[i]
        w, h = int(sizes[i][0]), int(sizes[i][1])
        w, h = min(w, W), min(h, H)
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        by0, by1, bx0, bx1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        ys, xs = np.nonzero(_outline(m[by0:by1, bx0:bx1]))
        ys, xs = ys + by0, xs + bx0
        if len(ys) > 4000:  # plenty for a nearest-pixel search
            keep = np.linspace(0, len(ys) - 1, 4000).astype(np.int64)
            ys, xs = ys[keep], xs[keep]
        step = max(2, h // 2)
        reach = int(math.ceil(max_leader)) + h
        choice = None
        for region in ("near", "anywhere"):
            if region == "near":
                gx = np.arange(bx0 - w - reach, bx1 + reach + 1, step)
                gy = np.arange(by0 - h - reach, by1 + reach + 1, step)
                # the classic spots first: flush above / below / beside the box
                extra_x = np.array([bx0, bx1 - w, bx1 + gap, bx0 - w - gap, (bx0 + bx1 - w) // 2])
                extra_y = np.array([by0 - h - gap, by1 + gap, by0, by1 - h, (by0 + by1 - h) // 2])
                gx = np.unique(np.concatenate([gx, extra_x]))
                gy = np.unique(np.concatenate([gy, extra_y]))
            else:
                gx = np.arange(0, max(W - w, 0) + 1, step)
                gy = np.arange(0, max(H - h, 0) + 1, step)
            gx = np.unique(np.clip(gx, 0, max(W - w, 0)))
            gy = np.unique(np.clip(gy, 0, max(H - h, 0)))
            cx, cy = np.meshgrid(gx, gy)
            cx, cy = cx.ravel(), cy.ravel()
            x1, y1 = cx + w, cy + h
            ok = np.ones(len(cx), bool)
            for b in boxes:  # no overlap with labels placed before
                ok &= (x1 <= b[0]) | (cx >= b[2]) | (y1 <= b[1]) | (cy >= b[3])
            if not ok.any():
                continue
            cx, cy, x1, y1 = cx[ok], cy[ok], x1[ok], y1[ok]
            # distance to the mask's bounding box (a lower bound of the distance to the mask)
            dbx = np.maximum(np.maximum(bx0 - x1, cx - bx1), 0)
            dby = np.maximum(np.maximum(by0 - y1, cy - by1), 0)
            dbox = np.hypot(dbx, dby)
            covered = (integral[y1, x1] - integral[cy, x1] - integral[y1, cx] + integral[cy, cx])
            frac = covered / float(w * h)
            above = (y1 <= by0 + 1)
            # beside the object: near its box, covering no mask, above if possible, centred on it
            cost = (dbox + 3.0 * h * frac + np.where(above, 0.0, 0.3 * h)
                    + 0.1 * np.abs((cx + x1) / 2.0 - (bx0 + bx1) / 2.0))
            cand = np.flatnonzero(dbox <= max_leader) if region == "near" else np.arange(len(cost))
            if not len(cand):
                continue
            top = cand[np.argsort(cost[cand], kind="stable")][:64]
            # exact distance to the mask (its outline pixels) for the best candidates
            d = _rect_point_distance(cx[top, None], cy[top, None], x1[top, None], y1[top, None],
                                     xs[None, :], ys[None, :])
            nearest = d.argmin(axis=1)
            dist = d[np.arange(len(top)), nearest]
            final = cost[top] - dbox[top] + dist
            if region == "near":
                final = np.where(dist <= max_leader, final, np.inf)
            best = int(np.argmin(final))
            if np.isfinite(final[best]):
                k, j = top[best], nearest[best]
                choice = (int(cx[k]), int(cy[k]), int(x1[k]), int(y1[k]),
                          (int(xs[j]), int(ys[j])), float(dist[best]))
                break
        if choice is None:
            continue  # no free room left in the frame
        x0_, y0_, x1_, y1_, anchor, dist = choice
        boxes = np.vstack([boxes, [[x0_, y0_, x1_, y1_]]])
        placed.append(LabelPlacement(i, (x0_, y0_, x1_, y1_), anchor, dist,
                                     leader=dist > 2 * gap + 1))
    return placed


# ----------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------
def render_overlay_frame(rgb: np.ndarray, masks: Sequence[Optional[np.ndarray]],
                         colors: Sequence[np.ndarray], texts: Sequence[str],
                         alpha: float = 0.5, font=None,
                         order: Optional[Sequence[int]] = None,
                         layout: Optional[List[LabelPlacement]] = None) -> np.ndarray:
    """Blend masks over one frame and draw the labels (see the module docstring).

    Args:
        rgb: uint8 (H, W, 3).
        masks: per instance bool (H, W) or None (absent in this frame).
        colors: per instance RGB float/uint8 (3,).
        texts: per instance label text ("" = no label).
        alpha: mask opacity.
        font: a Pillow font (default: :func:`font_size_for` the frame).
        order: label placement priority (e.g. descending score; default: given order).
        layout: if a list is given, the :class:`LabelPlacement` of every drawn label is
            appended to it.
    Returns:
        uint8 (H, W, 3) (a new array).
    Raises:
        ValueError: a mask of another size than the frame.
    """
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    out = rgb.astype(np.float32)
    thick = max(1, int(round(min(h, w) / 360)))
    for m, color in zip(masks, colors):
        if m is None:
            continue
        if m.shape != (h, w):
            raise ValueError(f"mask is {m.shape[0]}x{m.shape[1]} but the frame is {h}x{w}")
        if not m.any():
            continue
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        pad = thick
        r0, r1 = max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad)
        c0, c1 = max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad)
        sub = m[r0:r1, c0:c1]
        view = out[r0:r1, c0:c1]
        col = np.asarray(color, np.float32)
        view[sub] = view[sub] * (1.0 - alpha) + col * alpha
        edge = _outline(sub)
        if thick > 1:
            edge = _dilate(edge, thick - 1) & sub
        view[edge] = col
    img = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if not any(texts):
        return np.asarray(img)
    draw = ImageDraw.Draw(img)
    font = font or _font(h, w)
    pad = max(2, int(round(getattr(font, "size", 12) / 6)))
    sizes: List[Optional[Tuple[int, int]]] = []
    offsets = []
    for m, text in zip(masks, texts):
        if not text or m is None:
            sizes.append(None)
            offsets.append((0, 0))
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
        offsets.append((left, top))
    placements = place_labels(masks, sizes, (h, w), gap=max(2, pad), order=order)
    line_w = max(1, int(round(getattr(font, "size", 12) / 12)))
    for p in placements:
        color = tuple(int(c) for c in np.asarray(colors[p.index]).ravel()[:3])
        x0, y0, x1, y1 = p.box
        if p.leader:
            bx = min(max(p.anchor[0], x0), x1 - 1)
            by = min(max(p.anchor[1], y0), y1 - 1)
            draw.line([(bx, by), p.anchor], fill=(0, 0, 0), width=line_w + 2)
            draw.line([(bx, by), p.anchor], fill=color, width=line_w)
            r = line_w + 1
            draw.ellipse([p.anchor[0] - r, p.anchor[1] - r, p.anchor[0] + r, p.anchor[1] + r],
                         fill=color, outline=(0, 0, 0))
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color, outline=(0, 0, 0))
        lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        left, top = offsets[p.index]
        draw.text((x0 + pad - left, y0 + pad - top), texts[p.index], font=font,
                  fill=(0, 0, 0) if lum > 140 else (255, 255, 255))
        if layout is not None:
            layout.append(p)
    return np.asarray(img)


def _pick_encoder(suffix: str) -> Tuple[str, str, dict]:
    import av

    available = av.codecs_available
    if suffix == ".webm":
        candidates = [("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "30",
                                      "b": "0"}), ("libvpx", {})]
    else:
        candidates = [("libx264", {"preset": "veryfast", "crf": "20"}),
                      ("mpeg4", {"qmin": "2", "qmax": "8"})]
    for codec, opts in candidates:
        if codec in available:
            return codec, "yuv420p", opts
    raise ValueError(f"no encoder for an overlay '{suffix}' file in this FFmpeg build "
                     f"(tried {', '.join(c for c, _ in candidates)}); write an .mp4 instead")


def _views(instances, class_names, min_score) -> List[_OverlayInstance]:
    views = [_OverlayInstance(inst, class_names, k) for k, inst in enumerate(instances)]
    views = [v for v in views if v.score >= min_score]
    return sorted(views, key=lambda v: -v.score)  # labels placed best first


def _render(views: Sequence[_OverlayInstance], rgb: np.ndarray, t: int, alpha: float, font):
    return render_overlay_frame(rgb, [v.mask(t) for v in views], [v.color for v in views],
                                [v.text for v in views], alpha=alpha, font=font)


def write_overlay(path: PathLike, frames_iter: Iterable[Any],
                  instances: Sequence[Union[InstanceTrack, Mapping[str, Any]]],
                  class_names: Optional[Sequence[str]] = None, fps: Optional[float] = None,
                  *, alpha: float = 0.5, min_score: float = 0.0) -> int:
    """Write the overlay video (same size and timestamps as the input; module docstring).

    Args:
        path: output file (.mp4 recommended; .mkv/.avi/.mov/.webm work), written atomically.
        frames_iter: the video's frames in order: :class:`~dvis_trt.runtime.video.Frame`
            objects (their ``pts_seconds`` become the output's timestamps) or uint8 (H, W, 3)
            RGB arrays (e.g. ``source.iter_frames()``).
        instances: :class:`~dvis_trt.runtime.results.InstanceTrack` objects (``label``
            0-based) or YouTube-VIS result dicts (``category_id`` 1-based, ``segmentations``
            per frame, optional ``track_id``); masks at the frames' size.
        class_names: names in contiguous class order (``class_names[label]``); None -> "class
            <category_id>".
        fps: nominal frame rate (the stream's rate, and timestamps of frames without one;
            default 30 when None).
        alpha: mask opacity in [0, 1].
        min_score: instances scoring below this are not drawn (the official demo uses 0.3).

    Returns:
        Number of frames written.

    Raises:
        ValueError: no frames, frames of different sizes, a mask of the wrong size, or more
        frames than an instance has masks for.
    """
    import av

    path = Path(path)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    views = _views(instances, class_names, min_score)
    codec, pix_fmt, opts = _pick_encoder(path.suffix.lower())
    rate = fractions.Fraction(float(fps) if fps else 30.0).limit_denominator(1001)
    n = 0
    size: Optional[Tuple[int, int]] = None
    font = None
    pad = (0, 0)
    first_pts: Optional[float] = None
    tb = TIME_BASE
    last = -1
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w") as container:
            container.metadata["comment"] = OVERLAY_COMMENT   # so a re-run knows it is ours
            stream = None
            for item in frames_iter:
                rgb = np.asarray(getattr(item, "rgb", item))
                if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                    raise ValueError(f"frame {n}: expected uint8 (H, W, 3), got {rgb.dtype} "
                                     f"{rgb.shape}")
                if size is None:
                    size = rgb.shape[:2]
                    font = _font(size[0], size[1])
                    odd = size[0] % 2 or size[1] % 2
                    fmt = pix_fmt
                    if odd and codec in ("libx264", "libvpx-vp9"):
                        fmt = "yuv444p"  # exact odd size (4:2:0 needs even sides)
                    elif odd:
                        pad = (size[0] % 2, size[1] % 2)
                    stream = container.add_stream(codec, rate=rate)
                    stream.width = size[1] + pad[1]
                    stream.height = size[0] + pad[0]
                    stream.pix_fmt = fmt
                    # MPEG-4 Part 2 caps the clock at 65535 Hz
                    tb = fractions.Fraction(1, 60000) if codec == "mpeg4" else TIME_BASE
                    stream.codec_context.time_base = tb
                    if codec == "mpeg4":
                        stream.bit_rate = 8_000_000
                    stream.options = opts
                elif rgb.shape[:2] != size:
                    raise ValueError(f"frame {n} is {rgb.shape[0]}x{rgb.shape[1]}, frame 0 was "
                                     f"{size[0]}x{size[1]}")
                drawn = _render(views, rgb, n, alpha, font)
                if pad[0] or pad[1]:
                    drawn = np.pad(drawn, ((0, pad[0]), (0, pad[1]), (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(drawn), format="rgb24")
                stamp = getattr(item, "pts_seconds", None)
                if stamp is not None and first_pts is None:
                    first_pts = float(stamp)
                if stamp is not None:
                    pts = int(round((float(stamp) - first_pts) / tb))
                else:
                    pts = int(round(n / rate / tb))
                pts = max(pts, last + 1)  # strictly increasing, whatever the source says
                last = pts
                frame.pts = pts
                frame.time_base = tb
                for packet in stream.encode(frame):
                    container.mux(packet)
                n += 1
            if stream is None:
                raise ValueError(f"no frames to write to '{path}'")
            for packet in stream.encode():
                container.mux(packet)
    return n


from dvis_trt.outputs import OUTPUT_TAG  # noqa: E402

#: ``comment`` metadata of every overlay video we write.
OVERLAY_COMMENT = f"{OUTPUT_TAG} overlay"


def is_our_video(path: PathLike) -> bool:
    """True for a video this module wrote (its ``comment`` metadata is :data:`OVERLAY_COMMENT`)."""
    import av

    try:
        with av.open(str(path)) as c:
            meta = {k.lower(): v for k, v in dict(c.metadata or {}).items()}
    except Exception:  # noqa: BLE001 - not a video at all: not ours
        return False
    return meta.get("comment") == OVERLAY_COMMENT


def is_our_image(path: PathLike) -> bool:
    """True for a PNG this module wrote (``Software`` text :data:`OUTPUT_TAG`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == OUTPUT_TAG
    except Exception:  # noqa: BLE001
        return False


def write_contact_sheet(path: PathLike, frames_iter: Iterable[Any],
                        instances: Sequence[Union[InstanceTrack, Mapping[str, Any]]],
                        class_names: Optional[Sequence[str]] = None, *, num: int = 9,
                        num_frames: Optional[int] = None, tile_width: int = 640,
                        columns: Optional[int] = None, alpha: float = 0.5,
                        min_score: float = 0.0) -> List[int]:
    """Write ``num`` evenly spaced overlay frames as one PNG grid (a look without a player).

    Each tile is the frame rendered at full size (labels as in the video), scaled to
    ``tile_width`` pixels wide (never up), with a caption ``frame i · t s`` below it.

    Args:
        path: the PNG, written atomically.
        frames_iter: the video's frames (``Frame`` objects or RGB arrays), in order.
        instances / class_names / alpha / min_score: as :func:`write_overlay`.
        num: tiles (frames) wanted, >= 1; fewer when the video is shorter.
        num_frames: frames in the video (default: the instances' mask count; needed when
            there are no instances).
        tile_width: tile width in pixels.
        columns: grid columns (default ``ceil(sqrt(num))``).
    Returns:
        the frame indices shown.
    Raises:
        ValueError: num < 1, no frames, or the frame count is unknown.
    """
    from PIL import Image, ImageDraw

    if int(num) < 1:
        raise ValueError(f"--contact-sheet needs at least 1 frame, got {num}")
    views = _views(instances, class_names, min_score)
    total = num_frames if num_frames is not None else (views[0].num_frames if views else None)
    if not total:
        raise ValueError("the contact sheet needs the video's frame count")
    k = min(int(num), int(total))
    wanted = sorted({int(round(x)) for x in np.linspace(0, total - 1, k)})
    tiles, captions = [], []
    font = None
    for t, item in enumerate(frames_iter):
        if t > wanted[-1]:
            break
        if t not in wanted:
            continue
        rgb = np.asarray(getattr(item, "rgb", item))
        if font is None:
            font = _font(rgb.shape[0], rgb.shape[1])
        img = Image.fromarray(_render(views, rgb, t, alpha, font))
        if img.width > tile_width:
            img = img.resize((tile_width, max(1, round(img.height * tile_width / img.width))),
                             Image.LANCZOS)
        tiles.append(img)
        stamp = getattr(item, "pts_seconds", None)
        captions.append(f"frame {t}" + (f"  t={stamp:.3f} s" if stamp is not None else ""))
    if not tiles:
        raise ValueError("no frames for the contact sheet")
    cols = int(columns) if columns else int(math.ceil(math.sqrt(len(tiles))))
    rows = int(math.ceil(len(tiles) / cols))
    tw = max(t.width for t in tiles)
    th = max(t.height for t in tiles)
    cap_font = _font(max(360, th), None)
    cap_h = font_size_for(max(360, th)) + 8
    sheet = Image.new("RGB", (cols * tw + (cols + 1) * 4, rows * (th + cap_h) + (rows + 1) * 4),
                      (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (tile, cap) in enumerate(zip(tiles, captions)):
        r, c = divmod(i, cols)
        x, y = 4 + c * (tw + 4), 4 + r * (th + cap_h + 4)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + th + 3), cap, font=cap_font, fill=(230, 230, 230))
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Software", OUTPUT_TAG)   # so a re-run knows it is ours
    with atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG", pnginfo=info)
    return wanted
