"""Frame preprocessing exactly as the official demo does it (no torch).

Official path: ``demo_video/predictor.py`` (``VideoPredictor``) applies detectron2's
``ResizeShortestEdge([MIN_SIZE_TEST, MIN_SIZE_TEST], MAX_SIZE_TEST)`` to each uint8 frame
(pixels resized by **Pillow** ``BILINEAR``, which antialiases when shrinking), converts to
float32 CHW, and the model then normalises ``(x - PIXEL_MEAN) / PIXEL_STD`` and zero-pads
bottom/right to a multiple of ``SIZE_DIVISIBILITY`` (detectron2 ``ImageList.from_tensors``),
so padding is 0 *after* normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Tuple

import numpy as np
from PIL import Image

from dvis_trt.errors import InputError


def resize_shortest_edge_shape(h: int, w: int, short_edge: int, max_size: int) -> Tuple[int, int]:
    """Output (new_h, new_w) of detectron2 ``ResizeShortestEdge.get_output_shape``.

    The short side is scaled to ``short_edge``; if the long side then exceeds ``max_size`` the
    whole image is scaled down to fit; each side is rounded with ``int(x + 0.5)``.
    E.g. (360, 640, 480, 1333) -> (480, 853).
    """
    if h <= 0 or w <= 0:
        raise InputError(f"frame has an empty size {h}x{w}")
    size = float(short_edge)
    scale = size / min(h, w)
    if h < w:
        new_h, new_w = size, scale * w
    else:
        new_h, new_w = scale * h, size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h = new_h * scale
        new_w = new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def padded_shape(h: int, w: int, size_divisibility: int) -> Tuple[int, int]:
    """(Hp, Wp): ``(h, w)`` rounded up to a multiple of ``size_divisibility`` (≤ 1: unchanged)."""
    if size_divisibility and size_divisibility > 1:
        d = int(size_divisibility)
        return (h + d - 1) // d * d, (w + d - 1) // d * d
    return h, w


@dataclass(frozen=True)
class ResizeGeometry:
    """The sizes of one video through preprocessing, computed once per video.

    Attributes:
        orig: (H, W) of the decoded frames (what the final masks are returned at).
        resized: (h, w) after ``ResizeShortestEdge`` (:func:`resize_shortest_edge_shape`).
        padded: (Hp, Wp), ``resized`` padded to ``size_divisibility`` (:func:`padded_shape`).
    """

    orig: Tuple[int, int]
    resized: Tuple[int, int]
    padded: Tuple[int, int]

    @classmethod
    def of(cls, h0: int, w0: int, config: Any) -> "ResizeGeometry":
        """Geometry of an (h0, w0) video under ``config`` (an
        :class:`~dvis_trt.runtime.bundle.config.InferenceConfig`: ``min_size_test``,
        ``max_size_test``, ``size_divisibility``). Raises InputError for an empty size."""
        h, w = resize_shortest_edge_shape(h0, w0, config.min_size_test, config.max_size_test)
        return cls((int(h0), int(w0)), (h, w), padded_shape(h, w, config.size_divisibility))


def resize_frame(rgb: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Resize one RGB uint8 frame (H, W, 3) with Pillow BILINEAR, as detectron2's
    ``ResizeTransform.apply_image`` does for uint8 images. Returns uint8 (new_h, new_w, 3)."""
    if rgb.shape[0] == new_h and rgb.shape[1] == new_w:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))


def normalize_and_pad(resized: Sequence[np.ndarray], pixel_mean: Sequence[float],
                      pixel_std: Sequence[float], size_divisibility: int,
                      out: np.ndarray | None = None, input_format: str = "RGB") -> np.ndarray:
    """Stack resized uint8 frames into the segmenter's ``images`` input.

    Args:
        resized: T frames, uint8 (h, w, 3) RGB, all the same size.
        pixel_mean, pixel_std: per-channel (R, G, B) values in 0..255 units.
        size_divisibility: pad bottom/right with zeros to a multiple of this.
        out: optional preallocated float32 (T, 3, Hp, Wp) buffer to fill (reused across windows).
        input_format: the model's ``INPUT.FORMAT``: ``"RGB"``, or ``"BGR"`` (channels reversed
            before normalising, as the official demo predictor does for BGR models).
    Returns:
        float32 (T, 3, Hp, Wp): ``(x - mean) / std`` over the image, 0 in the padding.
    Raises:
        InputError: frames of different sizes, or an ``input_format`` other than RGB/BGR.
    """
    if input_format not in ("RGB", "BGR"):
        raise InputError(f"INPUT.FORMAT {input_format!r} is not supported (RGB or BGR)")
    channels = slice(None, None, -1) if input_format == "BGR" else slice(None)
    t = len(resized)
    h, w = resized[0].shape[:2]
    hp, wp = padded_shape(h, w, size_divisibility)
    if out is None or out.shape != (t, 3, hp, wp):
        out = np.zeros((t, 3, hp, wp), dtype=np.float32)
    else:
        out.fill(0.0)
    mean = np.asarray(pixel_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pixel_std, dtype=np.float32).reshape(3, 1, 1)
    for i, frame in enumerate(resized):
        if frame.shape[:2] != (h, w):
            raise InputError(f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, "
                             f"expected {w}x{h}: all frames of a video must have one size")
        chw = frame[:, :, channels].transpose(2, 0, 1).astype(np.float32)
        out[i, :, :h, :w] = (chw - mean) / std
    return out


def preprocess_frames(frames: Sequence[np.ndarray], min_size_test: int, max_size_test: int,
                      pixel_mean: Sequence[float], pixel_std: Sequence[float],
                      size_divisibility: int, input_format: str = "RGB"
                      ) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Official demo preprocessing of a list of frames.

    Args:
        frames: T RGB uint8 arrays (H, W, 3), one video (one size).
        min_size_test, max_size_test: ``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST``.
        pixel_mean, pixel_std: ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD`` (RGB order as in config).
        size_divisibility: ``MODEL.MASK_FORMER.SIZE_DIVISIBILITY`` (32 in practice).
        input_format: ``INPUT.FORMAT`` of the model (frames are always given as RGB).
    Returns:
        (images float32 (T, 3, Hp, Wp), (h, w)) where (h, w) is the resized, unpadded size.
    Raises:
        InputError: no frames, a frame that is not uint8 (H, W, 3), or frames of different sizes.
    """
    if len(frames) == 0:
        raise InputError("no frames to preprocess")
    f0 = frames[0]
    if f0.ndim != 3 or f0.shape[2] != 3 or f0.dtype != np.uint8:
        raise InputError(f"frames must be RGB uint8 (H, W, 3); got {f0.dtype} {tuple(f0.shape)}")
    h0, w0 = f0.shape[:2]
    new_h, new_w = resize_shortest_edge_shape(h0, w0, min_size_test, max_size_test)
    resized = []
    for i, f in enumerate(frames):
        if f.shape != f0.shape:
            raise InputError(f"frame {i} has shape {tuple(f.shape)}, frame 0 has {tuple(f0.shape)}")
        resized.append(resize_frame(np.ascontiguousarray(f), new_h, new_w))
    images = normalize_and_pad(resized, pixel_mean, pixel_std, size_divisibility,
                               input_format=input_format)
    return images, (new_h, new_w)
