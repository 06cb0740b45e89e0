"""Synthetic but real videos for the demo and the tests (PyAV; no torch).

:func:`make_demo_video` renders a few textured objects (ellipses and regular polygons with
striped/checked textures) moving over a textured background — some enter or leave the frame,
they pass in front of each other — and encodes them with a real codec into a real container.
The frames that were encoded and each object's visible mask come back with the path, so tests
can compare what a decoder returns with what went in.

Odd frame sizes: the default ``libx264`` + ``yuv444p`` (H.264 High 4:4:4 Predictive, lossless
``qp=0``) encodes any size, so 333x501 decodes back as 333x501. ``mpeg4``/``yuv420p``,
``ffv1`` (any pix_fmt), ``libvpx-vp9`` and ``mjpeg`` also take odd sizes. Codecs that need even
sizes for subsampled chroma (``libx264``/``libx265`` with ``yuv420p``/``yuv422p``) raise a
``ValueError`` naming the alternatives — we never silently pad, since the decoded size would
then differ from the requested one.

:func:`make_broken_videos` writes damaged files (empty, not a video, truncated, corrupt, no
frames, audio only) for the error-path tests.
"""
from __future__ import annotations

import fractions
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from dvis_trt.fileio import atomic_output

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class DemoVideo:
    """What :func:`make_demo_video` wrote.

    Attributes:
        path: the video file.
        frames: uint8 (T, H, W, 3) RGB frames as handed to the encoder (stored orientation,
            i.e. before the ``rotate`` display metadata is applied).
        masks: bool (T, N, H, W) visible region of each object (occlusion applied), same
            orientation as ``frames``.
        fps, codec, pix_fmt: as encoded.
        rotate: clockwise degrees of display rotation written as metadata (or None).
        lossless: whether the codec ran lossless (decoded == frames up to the RGB<->YUV
            round trip).
    """

    path: Path
    frames: np.ndarray
    masks: np.ndarray
    fps: float
    codec: str
    pix_fmt: str
    rotate: Optional[int] = None
    lossless: bool = True
    object_kinds: List[str] = field(default_factory=list)

    def displayed_frames(self) -> np.ndarray:
        """``frames`` turned upright as a player shows them (rotation applied): (T, H', W', 3)."""
        k = -int(round((self.rotate or 0) / 90.0))  # clockwise display rotation
        return np.ascontiguousarray(np.rot90(self.frames, k=k, axes=(1, 2)))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], float32 (h, w): a random grid, bilinearly upsampled."""
    gh, gw = max(2, cells), max(2, int(round(cells * w / max(h, 1))))
    grid = rng.random((gh, gw)).astype(np.float32)
    ys = np.linspace(0, gh - 1, h, dtype=np.float32)
    xs = np.linspace(0, gw - 1, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), gh - 2)
    x0 = np.minimum(xs.astype(int), gw - 2)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx)
            + g11 * fy * fx)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured background, float32 (h, w, 3) in [0, 255]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 170, size=3).astype(np.float32)
    out = np.empty((h, w, 3), np.float32)
    for c in range(3):
        n = _smooth_noise(rng, h, w, 4)
        n2 = _smooth_noise(rng, h, w, 16)
        ang = rng.uniform(0, math.pi)
        period = rng.uniform(18, 40)
        grating = np.sin(2 * math.pi * (xx * math.cos(ang) + yy * math.sin(ang)) / period)
        out[..., c] = base[c] + 50 * (n - 0.5) + 18 * (n2 - 0.5) + 10 * grating
    return out


@dataclass
class _Obj:
    kind: str                # "ellipse" or "polygon"
    sides: int
    radius: Tuple[float, float]
    p0: Tuple[float, float]  # (x, y) at t = 0
    p1: Tuple[float, float]  # (x, y) at t = T - 1
    angle0: float
    spin: float
    colors: Tuple[np.ndarray, np.ndarray]
    pattern: str             # "stripes" or "checks"
    period: float
    wobble: float


#: Object motions of :func:`render_scene`: ``mixed`` (the demo: objects enter, leave, drift and
#: pass in front of each other), ``drift`` (every object stays inside and drifts slowly),
#: ``cross`` (objects travel between opposite sides through the centre, crossing and occluding
#: each other mid-clip).
MOTIONS = ("mixed", "drift", "cross")


def _make_objects(rng: np.random.Generator, h: int, w: int, n: int,
                  motion: str = "mixed") -> List[_Obj]:
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    objs = []
    s = float(min(h, w))
    for i in range(n):
        kind = "ellipse" if i % 2 == 0 else "polygon"
        r = s * rng.uniform(0.12, 0.22)
        radius = (r, r * rng.uniform(0.55, 0.9)) if kind == "ellipse" else (r, r)
        cy0, cy1 = rng.uniform(0.25, 0.75, size=2) * h
        role = i % 4
        if role == 0:    # crosses the frame left -> right: enters, then leaves
            p0, p1 = (-r * 1.1, cy0), (w + r * 1.1, cy1)
        elif role == 1:  # stays inside, drifts
            p0 = (rng.uniform(0.3, 0.45) * w, rng.uniform(0.35, 0.6) * h)
            p1 = (rng.uniform(0.55, 0.7) * w, rng.uniform(0.35, 0.6) * h)
        elif role == 2:  # enters from the bottom
            p0, p1 = (rng.uniform(0.3, 0.7) * w, h + r * 1.1), (rng.uniform(0.3, 0.7) * w, 0.4 * h)
        else:            # leaves through the top-right
            p0, p1 = (0.4 * w, 0.55 * h), (w + r * 0.5, -r * 0.5)
        if motion == "drift":    # stays inside: a short drift around its own spot
            cx, cy = (0.2 + 0.6 * ((i * 0.37) % 1.0)) * w, (0.3 + 0.4 * ((i * 0.61) % 1.0)) * h
            d = 0.08 * s
            p0, p1 = (cx - d, cy - d / 2), (cx + d, cy + d / 2)
        elif motion == "cross":  # opposite sides through the centre, all meet mid-clip
            ang = math.pi * i / max(n, 1) + 0.3
            rx, ry = 0.38 * w, 0.32 * h
            p0 = (w / 2 - rx * math.cos(ang), h / 2 - ry * math.sin(ang))
            p1 = (w / 2 + rx * math.cos(ang), h / 2 + ry * math.sin(ang))
        c1 = rng.uniform(0, 255, size=3).astype(np.float32)
        c2 = np.clip(c1 + rng.choice([-1, 1], size=3) * rng.uniform(50, 110, size=3), 0, 255)
        objs.append(_Obj(kind=kind, sides=int(rng.integers(3, 7)), radius=radius, p0=p0, p1=p1,
                         angle0=float(rng.uniform(0, 2 * math.pi)),
                         spin=float(rng.uniform(-0.15, 0.15)), colors=(c1, c2.astype(np.float32)),
                         pattern="stripes" if i % 3 != 1 else "checks",
                         period=float(rng.uniform(5, 11)), wobble=float(rng.uniform(0, 0.04) * s)))
    return objs


def _render(obj: _Obj, t: int, num_frames: int, grid: Tuple[np.ndarray, np.ndarray],
            tex_noise: np.ndarray) -> Optional[Tuple[Tuple[slice, slice], np.ndarray, np.ndarray]]:
    """One object at frame t, inside its bounding box.

    Returns ``((row slice, col slice), mask bool (h', w'), colour float32 (h', w', 3))`` or
    None when the object is entirely outside the frame.
    """
    a = t / max(num_frames - 1, 1)
    cx = obj.p0[0] + (obj.p1[0] - obj.p0[0]) * a + obj.wobble * math.sin(2.1 * t)
    cy = obj.p0[1] + (obj.p1[1] - obj.p0[1]) * a + obj.wobble * math.cos(1.7 * t)
    ang = obj.angle0 + obj.spin * t
    yy, xx = grid
    h, w = yy.shape
    reach = max(obj.radius) + 1.0  # the shape lies inside this circle whatever its angle
    y0, y1 = max(0, int(cy - reach)), min(h, int(math.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(math.ceil(cx + reach)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    box = (slice(y0, y1), slice(x0, x1))
    dx, dy = xx[box] - cx, yy[box] - cy
    u = dx * math.cos(ang) + dy * math.sin(ang)   # object coordinates (rotate by -ang)
    v = -dx * math.sin(ang) + dy * math.cos(ang)
    if obj.kind == "ellipse":
        mask = (u / obj.radius[0]) ** 2 + (v / obj.radius[1]) ** 2 <= 1.0
    else:  # regular polygon: inside every edge's half-plane
        n, r = obj.sides, obj.radius[0]
        mask = np.ones(u.shape, bool)
        for k in range(n):
            phi = 2 * math.pi * k / n + math.pi / n
            mask &= u * math.cos(phi) + v * math.sin(phi) <= r * math.cos(math.pi / n)
    if obj.pattern == "stripes":
        wgt = 0.5 + 0.5 * np.sin(2 * math.pi * u / obj.period)
    else:
        wgt = ((np.floor(u / obj.period) + np.floor(v / obj.period)) % 2).astype(np.float32)
    wgt = np.clip(wgt + 0.35 * (tex_noise[box] - 0.5), 0, 1)[..., None]
    color = obj.colors[0] * (1 - wgt) + obj.colors[1] * wgt
    return box, mask, color


def render_scene(num_frames: int, size: Tuple[int, int], seed: int = 0,
                 num_objects: int = 4, motion: str = "mixed"
                 ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Render the demo scene without encoding it (``motion``: one of :data:`MOTIONS`).

    Returns:
        (frames uint8 (T, H, W, 3), visible masks bool (T, N, H, W), object kinds).
    """
    h, w = int(size[0]), int(size[1])
    if h < 2 or w < 2 or num_frames < 1:
        raise ValueError(f"need size >= 2x2 and num_frames >= 1, got {size}, {num_frames}")
    rng = np.random.default_rng(seed)
    bg = _background(rng, h, w)
    objs = _make_objects(rng, h, w, num_objects, motion)
    tex = [_smooth_noise(rng, h, w, 24) for _ in objs]
    grid = tuple(np.mgrid[0:h, 0:w].astype(np.float32))
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    masks = np.zeros((num_frames, len(objs), h, w), bool)
    for t in range(num_frames):
        img = bg.copy()
        taken = np.zeros((h, w), bool)
        # paint front to back: object i is in front of objects < i
        for i in range(len(objs) - 1, -1, -1):
            drawn = _render(objs[i], t, num_frames, grid, tex[i])
            if drawn is None:
                continue
            box, m, color = drawn
            vis = m & ~taken[box]
            img[box][vis] = color[vis]
            masks[t, i][box] = vis
            taken[box] |= m
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames, masks, [o.kind for o in objs]


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

def _codec_options(codec: str, lossless: bool) -> Dict[str, str]:
    if codec == "libx264":
        return {"preset": "veryfast", **({"qp": "0"} if lossless else {"crf": "18"})}
    if codec == "libx264rgb":
        return {"preset": "veryfast", **({"qp": "0"} if lossless else {"crf": "18"})}
    if codec == "libx265":
        return {"preset": "ultrafast",
                "x265-params": "log-level=error" + (":lossless=1" if lossless else ":crf=20")}
    if codec == "libvpx-vp9":
        return {"deadline": "realtime", "cpu-used": "8",
                **({"lossless": "1"} if lossless else {"crf": "20", "b": "0"})}
    if codec == "libsvtav1":
        return {"preset": "12", "crf": "8" if lossless else "24"}
    if codec in ("mpeg4", "mjpeg", "mpeg2video"):
        return {"qmin": "1", "qmax": "2"}
    return {}


_LOSSLESS_CODECS = {"ffv1", "rawvideo", "png", "qtrle", "utvideo", "huffyuv", "ffvhuff"}


def encode_frames(path: PathLike, frames: np.ndarray, fps: float = 10, codec: str = "libx264",
                  pix_fmt: str = "yuv444p", rotate: Optional[int] = None,
                  rotate_as_tag: bool = False, lossless: bool = True,
                  options: Optional[Dict[str, str]] = None) -> Path:
    """Encode uint8 (T, H, W, 3) RGB frames into a video file, atomically.

    Args:
        path: output file; the container comes from the suffix (.mp4, .mkv, .webm, .avi, .mov).
        frames: uint8 (T, H, W, 3) RGB.
        fps: frame rate (constant).
        codec / pix_fmt: any encoder PyAV has and a pixel format it takes (the RGB frames are
            converted by swscale, BT.601).
        rotate: clockwise display rotation in degrees (multiple of 90), written as
            display-matrix side data (what phones do), or None.
        rotate_as_tag: write the legacy ``rotate`` stream tag instead (kept by MKV; MP4 drops
            it) — to test readers' fallback path.
        lossless: lossless settings for codecs that have them (x264/x265 ``qp 0``, VP9
            ``lossless 1``; ffv1 always); near-lossless quantiser for mpeg4/mjpeg.
        options: extra encoder options (override the defaults).

    Raises:
        ValueError: the codec is not available, or it refuses the size/pixel format (e.g.
        odd sizes with 4:2:0 in libx264), with a suggestion.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("no frames to encode")
    if codec not in av.codecs_available:
        raise ValueError(f"codec {codec!r} is not in this PyAV/FFmpeg build")
    if rotate is not None and int(rotate) % 90 != 0:
        raise ValueError(f"rotate must be a multiple of 90 degrees, got {rotate}")
    t_len, h, w, _ = frames.shape
    opts = {**_codec_options(codec, lossless), **(options or {})}
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            if codec in ("mpeg4", "mjpeg", "mpeg2video"):
                stream.bit_rate = 40_000_000
            stream.options = opts
            if rotate is not None and int(rotate) % 360 != 0:
                if rotate_as_tag or not hasattr(stream, "set_display_rotation"):
                    stream.metadata["rotate"] = str(int(rotate) % 360)
                else:
                    stream.set_display_rotation(-int(rotate))  # PyAV: counter-clockwise
            try:
                for t in range(t_len):
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[t]),
                                                       format="rgb24")
                    frame.pts = t
                    for packet in stream.encode(frame):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            except (av.FFmpegError, ValueError) as exc:
                hint = ""
                if h % 2 or w % 2:
                    hint = (f"; {codec} with {pix_fmt} may need even sizes — for odd sizes use "
                            f"pix_fmt='yuv444p' (libx264) or codec='mpeg4'/'ffv1'")
                raise ValueError(f"encoding {h}x{w} {pix_fmt} with {codec} failed: "
                                 f"{' '.join(str(exc).split())}{hint}") from None
    return Path(path)


def make_demo_video(path: PathLike, num_frames: int = 24, size: Tuple[int, int] = (333, 501),
                    fps: float = 10, seed: int = 0, codec: str = "libx264",
                    pix_fmt: str = "yuv444p", rotate: Optional[int] = None, *,
                    num_objects: int = 4, lossless: bool = True,
                    rotate_as_tag: bool = False, motion: str = "mixed") -> DemoVideo:
    """Render and encode the demo clip: moving textured objects over a textured background.

    Args:
        path: output video (container from the suffix; .mp4 is a good default).
        num_frames: T.
        size: (H, W) of the stored frames; odd sizes work with the default codec.
        fps: frame rate.
        seed: everything (background, objects, paths) is a function of the seed.
        codec, pix_fmt: encoder and its pixel format (default libx264 + yuv444p, lossless).
        rotate: clockwise display rotation (90/180/270) written as metadata; frames are stored
            unrotated, so a reader that honours it returns ``np.rot90(frame, -rotate/90)``.
        num_objects: objects in the scene (object ``i`` is in front of objects ``< i``).
        lossless: see :func:`encode_frames`.
        rotate_as_tag: see :func:`encode_frames`.
        motion: ``mixed`` (default), ``drift`` or ``cross`` (:data:`MOTIONS`).

    Returns:
        :class:`DemoVideo` with the encoded frames and the objects' visible masks.
    """
    frames, masks, kinds = render_scene(num_frames, size, seed=seed, num_objects=num_objects,
                                        motion=motion)
    encode_frames(path, frames, fps=fps, codec=codec, pix_fmt=pix_fmt, rotate=rotate,
                  rotate_as_tag=rotate_as_tag, lossless=lossless)
    return DemoVideo(path=Path(path), frames=frames, masks=masks, fps=float(fps), codec=codec,
                     pix_fmt=pix_fmt, rotate=rotate,
                     lossless=lossless and codec in ({"libx264", "libx264rgb", "libx265",
                                                      "libvpx-vp9"} | _LOSSLESS_CODECS),
                     object_kinds=kinds)


def make_broken_videos(directory: PathLike) -> Dict[str, Path]:
    """Write damaged inputs for error-path tests into ``directory``.

    Returns a dict name -> path:
        ``empty`` (0-byte .mp4), ``not_video`` (text with a .mp4 name), ``truncated`` (an MP4
        with its index up front, cut at 60%: decoding fails midway), ``truncated_mkv`` (an MKV
        cut at 60%: the stream just stops — detectable only against the announced duration),
        ``corrupt`` (an MP4 with 3 KB of random bytes over the middle of its frame data),
        ``no_frames`` (an AVI with a video stream but no frames), ``audio_only`` (an M4A).
    """
    import av

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    # noise frames: every frame costs many bytes, so a cut lands mid-stream
    noise = rng.integers(0, 256, size=(20, 64, 96, 3), dtype=np.uint8)
    out: Dict[str, Path] = {}

    out["empty"] = d / "empty.mp4"
    out["empty"].write_bytes(b"")
    out["not_video"] = d / "not_video.mp4"
    out["not_video"].write_text("this is not a video\n" * 50)

    def _encode_raw(p: Path, container_options=None):
        with av.open(str(p), "w", options=container_options or {}) as c:
            s = c.add_stream("libx264", rate=10)
            s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
            s.options = {"preset": "ultrafast", "crf": "10"}
            for t in range(noise.shape[0]):
                for pkt in s.encode(av.VideoFrame.from_ndarray(noise[t], format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)

    full = d / "_full_faststart.mp4"
    _encode_raw(full, {"movflags": "faststart"})
    data = full.read_bytes()
    out["truncated"] = d / "truncated.mp4"
    out["truncated"].write_bytes(data[: int(len(data) * 0.6)])
    full.unlink()

    full = d / "_full.mkv"
    _encode_raw(full)
    data = full.read_bytes()
    out["truncated_mkv"] = d / "truncated.mkv"
    out["truncated_mkv"].write_bytes(data[: int(len(data) * 0.6)])
    full.unlink()

    full = d / "_full.mp4"
    _encode_raw(full)
    data = bytearray(full.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 3000] = rng.integers(0, 256, size=3000, dtype=np.uint8).tobytes()
    out["corrupt"] = d / "corrupt.mp4"
    out["corrupt"].write_bytes(bytes(data))
    full.unlink()

    out["no_frames"] = d / "no_frames.avi"
    with av.open(str(out["no_frames"]), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()

    out["audio_only"] = d / "audio_only.m4a"
    with av.open(str(out["audio_only"]), "w") as c:
        s = c.add_stream("aac", rate=16000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                        layout="mono")
        fr.sample_rate = 16000
        for pkt in s.encode(fr):
            c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return out
