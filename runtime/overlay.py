"""Overlay video: the input frames with each instance's mask tinted in its colour and a label.

:func:`write_overlay` streams frames (nothing but the current frame is held), blends every
instance's mask with alpha ``0.5`` in a colour fixed by its track id, outlines it, writes
``#<track id> <class name> <score>`` above the mask with Pillow's default font, and encodes
with PyAV: ``libx264`` / ``yuv420p`` (plays everywhere) when this FFmpeg has it, else
``mpeg4`` / ``yuv420p`` (``libvpx-vp9`` for ``.webm``). 4:2:0 needs even sizes, so odd frame
sizes are padded by one replicated row/column at the bottom/right. The file is written
atomically (:func:`~dvis_trt.runtime.results.atomic_output`).
"""
from __future__ import annotations

import colorsys
import fractions
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .results import InstanceTrack, atomic_output, decode_rle

PathLike = Union[str, "os.PathLike[str]"]


def track_color(track_id: int) -> Tuple[int, int, int]:
    """A saturated RGB colour per track id (golden-ratio hue steps; deterministic)."""
    hue = (int(track_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


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
        self.text = f"#{self.track_id} {name} {self.score:.2f}"
        self.color = np.array(track_color(self.track_id), np.float32)
        self.num_frames = len(self._masks) if self._masks is not None else len(self._segs)

    def mask(self, t: int) -> np.ndarray:
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


def _font(height: int):
    from PIL import ImageFont

    size = max(10, int(round(height / 36)))
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (needs FreeType)
    except TypeError:
        return ImageFont.load_default()
    except OSError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def render_overlay_frame(rgb: np.ndarray, masks: Sequence[Optional[np.ndarray]],
                         colors: Sequence[np.ndarray], texts: Sequence[str],
                         alpha: float = 0.5, font=None) -> np.ndarray:
    """Blend masks over one frame and draw the labels.

    Args:
        rgb: uint8 (H, W, 3).
        masks: per instance bool (H, W) or None (absent in this frame).
        colors: per instance RGB float/uint8 (3,).
        texts: per instance label text ("" = no label).
        alpha: mask opacity.
    Returns:
        uint8 (H, W, 3) (a new array).
    """
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    out = rgb.astype(np.float32)
    labels = []
    for m, color, text in zip(masks, colors, texts):
        if m is None or not m.any():
            continue
        if m.shape != (h, w):
            raise ValueError(f"mask is {m.shape[0]}x{m.shape[1]} but the frame is {h}x{w}")
        out[m] = out[m] * (1.0 - alpha) + np.asarray(color, np.float32) * alpha
        out[_outline(m)] = color
        if not text:
            continue
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        labels.append((int(cols[0]), int(rows[0]), text, tuple(int(c) for c in color)))
    img = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if labels:
        draw = ImageDraw.Draw(img)
        font = font or _font(h)
        for x, y, text, color in labels:
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tw, th = right - left, bottom - top
            x0 = min(max(0, x), max(0, w - tw - 4))
            y0 = y - th - 4 if y - th - 4 >= 0 else min(y, max(0, h - th - 4))
            draw.rectangle([x0, y0, x0 + tw + 3, y0 + th + 3], fill=color)
            lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
            draw.text((x0 + 2 - left, y0 + 2 - top), text, font=font,
                      fill=(0, 0, 0) if lum > 140 else (255, 255, 255))
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


def write_overlay(path: PathLike, frames_iter: Iterable[Any],
                  instances: Sequence[Union[InstanceTrack, Mapping[str, Any]]],
                  class_names: Optional[Sequence[str]] = None, fps: Optional[float] = None,
                  *, alpha: float = 0.5, min_score: float = 0.0) -> int:
    """Write the overlay video.

    Args:
        path: output file (.mp4 recommended; .mkv/.avi/.mov/.webm work), written atomically.
        frames_iter: the video's frames in order: :class:`~dvis_trt.runtime.video.Frame`
            objects or uint8 (H, W, 3) RGB arrays (e.g. ``source.iter_frames()``).
        instances: :class:`~dvis_trt.runtime.results.InstanceTrack` objects (``label``
            0-based) or YouTube-VIS result dicts (``category_id`` 1-based, ``segmentations``
            per frame, optional ``track_id``); masks at the frames' size.
        class_names: names in contiguous class order (``class_names[label]``); None -> "class
            <category_id>".
        fps: output frame rate (constant; default 30 when None).
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
    views = [_OverlayInstance(inst, class_names, k) for k, inst in enumerate(instances)]
    views = [v for v in views if v.score >= min_score]
    codec, pix_fmt, opts = _pick_encoder(path.suffix.lower())
    rate = fractions.Fraction(float(fps) if fps else 30.0).limit_denominator(1001)
    n = 0
    size: Optional[Tuple[int, int]] = None
    font = None
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w") as container:
            stream = None
            for item in frames_iter:
                rgb = np.asarray(getattr(item, "rgb", item))
                if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                    raise ValueError(f"frame {n}: expected uint8 (H, W, 3), got {rgb.dtype} "
                                     f"{rgb.shape}")
                if size is None:
                    size = rgb.shape[:2]
                    font = _font(size[0])
                    stream = container.add_stream(codec, rate=rate)
                    stream.width = size[1] + size[1] % 2
                    stream.height = size[0] + size[0] % 2
                    stream.pix_fmt = pix_fmt
                    if codec == "mpeg4":
                        stream.bit_rate = 8_000_000
                    stream.options = opts
                elif rgb.shape[:2] != size:
                    raise ValueError(f"frame {n} is {rgb.shape[0]}x{rgb.shape[1]}, frame 0 was "
                                     f"{size[0]}x{size[1]}")
                drawn = render_overlay_frame(rgb, [v.mask(n) for v in views],
                                             [v.color for v in views], [v.text for v in views],
                                             alpha=alpha, font=font)
                pad = ((0, size[0] % 2), (0, size[1] % 2), (0, 0))
                if pad[0][1] or pad[1][1]:
                    drawn = np.pad(drawn, pad, mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(drawn), format="rgb24")
                frame.pts = n
                for packet in stream.encode(frame):
                    container.mux(packet)
                n += 1
            if stream is None:
                raise ValueError(f"no frames to write to '{path}'")
            for packet in stream.encode():
                container.mux(packet)
    return n
