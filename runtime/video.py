"""Video input: any file FFmpeg reads (PyAV), a folder of frames, or a YouTube-VIS dataset json.

Every source yields :class:`Frame` objects — ``index`` (0, 1, 2, ... in the order the decoder
delivers them), ``pts_seconds`` (presentation time in seconds, kept as stored so variable frame
rate survives) and ``rgb`` (uint8 (H, W, 3), C-contiguous, upright).

- :func:`open_source` ``(path) -> VideoSource``: a video file (H.264/H.265/VP9/AV1/MPEG-4/... in
  MP4/MOV/MKV/WebM/AVI/...), a folder of frames (YouTube-VIS ``JPEGImages/<video>/`` layout) or a
  single image.
- :func:`load_ytvis_videos` ``(json, root) -> list[YtvisVideo]``: the videos of a YouTube-VIS /
  OVIS dataset json, each openable as a frame-folder source.
- :func:`prefetch` ``(source, max_queue) -> Prefetcher``: decode in a background thread into a
  bounded queue; decode errors are re-raised in the consumer.

Video files: the rotation a phone stores as display-matrix side data (or as a legacy ``rotate``
tag) is applied, flips included, so a clip stored 1920x1080 with a 90-degree rotation comes out
1080x1920. Every pixel format FFmpeg knows (yuv420p/422p/444p, full-range yuvj*, gray, rgb24,
10/12-bit, ...) is converted to 8-bit RGB by swscale, honouring the frame's colour matrix and
range tags (PyAV's ``VideoFrame.to_ndarray(format="rgb24")``).

Frames from image folders are read like the official code reads YouTube-VIS frames
(detectron2 ``read_image``: Pillow, EXIF orientation applied, converted to RGB). Files are
sorted in natural order (``9.jpg`` before ``10.jpg``; zero-padded names sort as the official
demo's plain ``sort()`` would).

Errors are :class:`~dvis_trt.runtime.errors.InputError` with one line saying what, where and
what to do: missing path, a file FFmpeg cannot open, no video stream, no frames, a file that
breaks off or is corrupt midway (the message names the frame), an empty folder.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Image file suffixes a frame folder may hold (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_REPAIR_HINT = ("re-encode or repair the file (e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p "
                "OUT.mp4`), or decode it leniently (`dvis-trt run --lenient`) to skip the damaged part")


def _one_line(text: object) -> str:
    """Collapse whitespace so an error message stays on one line."""
    return " ".join(str(text).split())


@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded frame.

    Attributes:
        index: 0-based position on the video's timeline: the order frames leave the decoder
            (for a frame folder: the sorted file order), except that in lenient decoding the
            frames lost to damage keep their slots (placed by timestamps), so the frames after
            them keep their true index (see ``VideoSource.lost_frames``).
        pts_seconds: presentation timestamp in seconds as stored in the container (not
            re-based; variable frame rate preserved), ``index / fps`` for a frame folder with a
            given ``fps``, or ``None`` when unknown.
        rgb: uint8 (H, W, 3) RGB, C-contiguous, rotation metadata already applied.
    """

    index: int
    pts_seconds: Optional[float]
    rgb: np.ndarray


class VideoSource:
    """A readable video: metadata known up front, frames on demand (re-iterable).

    Attributes:
        name: short name (file stem, folder name, or the YouTube-VIS video folder).
        path: the file or folder (``None`` for an explicit file list without a common folder).
        num_frames: number of frames if the container/folder says so, else ``None``.
        fps: average frame rate (frames/s) or ``None`` when unknown.
        size: ``(H, W)`` of the frames :meth:`iter_frames` yields (after rotation).
        video_id: the dataset's video id (YouTube-VIS sources), else ``None``.
        lost_frames: after a full :meth:`iter_frames`: ``[(start, stop), ...]`` timeline
            ranges of frames lost to damage (lenient decoding only; empty otherwise).
        timeline_frames: after a full :meth:`iter_frames`: the video's frame count on its
            timeline (decoded + lost), or ``None`` when the source does not track it.
    """

    name: str
    path: Optional[Path]
    num_frames: Optional[int]
    fps: Optional[float]
    size: Tuple[int, int]
    video_id: Optional[int] = None
    lost_frames: Sequence[Tuple[int, int]] = ()
    timeline_frames: Optional[int] = None

    def iter_frames(self) -> Iterator[Frame]:
        """Yield every frame from the start; each call starts over. Raises InputError."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        return self.iter_frames()

    def __repr__(self) -> str:
        h, w = self.size
        return (f"{type(self).__name__}(name={self.name!r}, size={h}x{w}, "
                f"num_frames={self.num_frames}, fps={self.fps})")


# --------------------------------------------------------------------------------------------
# Orientation (display matrix / rotate tag)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Orientation:
    """How to turn a stored picture upright: transpose first, then flip rows / columns.

    Covers the 8 axis-aligned orientations (4 rotations x optional mirror).
    """

    transpose: bool = False
    flip_rows: bool = False  # flip top <-> bottom
    flip_cols: bool = False  # flip left <-> right

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def apply(self, img: np.ndarray) -> np.ndarray:
        """(H, W, ...) -> upright image, C-contiguous (a copy only when something changes)."""
        if self.transpose:
            img = np.swapaxes(img, 0, 1)
        if self.flip_rows:
            img = img[::-1]
        if self.flip_cols:
            img = img[:, ::-1]
        return np.ascontiguousarray(img)

    def out_size(self, h: int, w: int) -> Tuple[int, int]:
        return (w, h) if self.transpose else (h, w)


def orientation_from_display_matrix(matrix: Sequence[int]) -> Orientation:
    """Orientation for an FFmpeg display matrix (9 int32, 16.16 fixed point, row-major).

    FFmpeg (libavutil/display.h) maps a stored pixel (x, y) to its displayed position
    ``x' = a*x + c*y``, ``y' = b*x + d*y`` with ``a, b, c, d = m[0], m[1], m[3], m[4]`` (y axis
    pointing down). The 2x2 part is snapped to the nearest signed permutation (rotations that
    are not multiples of 90 degrees are rounded). For example ``av_display_rotation_get`` = 90
    (counter-clockwise) gives ``np.rot90(img, 1)``; -90 (the usual portrait phone clip)
    gives ``np.rot90(img, -1)``; a pure horizontal mirror gives ``img[:, ::-1]``.
    """
    a, b, _, c, d = (float(v) for v in list(matrix)[:5])
    if abs(a) + abs(d) >= abs(b) + abs(c):
        # x' = a*x, y' = d*y
        return Orientation(False, flip_rows=d < 0, flip_cols=a < 0)
    # x' = c*y, y' = b*x: out[b*x, c*y] = in[y, x] -> transpose, then flips
    return Orientation(True, flip_rows=b < 0, flip_cols=c < 0)


def orientation_from_rotate_tag(degrees_cw: float) -> Orientation:
    """Orientation for a legacy ``rotate`` tag (degrees the player turns the picture clockwise)."""
    k = int(round(float(degrees_cw) / 90.0)) % 4
    return {0: Orientation(),
            1: Orientation(True, flip_rows=False, flip_cols=True),   # 90 cw  = np.rot90(img, -1)
            2: Orientation(False, flip_rows=True, flip_cols=True),   # 180
            3: Orientation(True, flip_rows=True, flip_cols=False)}[k]  # 270 cw = np.rot90(img, 1)


def _frame_display_matrix(frame) -> Optional[np.ndarray]:
    try:
        side_data = list(frame.side_data)
    except Exception:  # very old PyAV or a frame without side data support
        return None
    for sd in side_data:
        sd_type = getattr(sd, "type", None)
        if getattr(sd_type, "name", str(sd_type)).split(".")[-1] == "DISPLAYMATRIX":
            raw = bytes(sd)
            if len(raw) >= 36:
                return np.frombuffer(raw[:36], dtype=np.int32).copy()
    return None


def _stream_rotate_tag(stream) -> Optional[float]:
    for key, value in dict(stream.metadata or {}).items():
        if key.lower() == "rotate":
            try:
                return float(value)
            except ValueError:
                return None
    return None


# --------------------------------------------------------------------------------------------
# Video files (PyAV)
# --------------------------------------------------------------------------------------------

def _import_av():
    try:
        import av  # noqa: F401
    except ImportError as exc:  # pragma: no cover - av is a hard dependency
        from .errors import DependencyError
        raise DependencyError("reading videos needs PyAV; install it (pip install av)") from exc
    return av


def _rate(value) -> Optional[float]:
    try:
        f = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if f > 0 and math.isfinite(f) else None


class AVVideoSource(VideoSource):
    """A video file decoded by PyAV/FFmpeg (first video stream that is not cover art).

    Opening probes the file: it decodes the first frame to learn the size, pixel format and
    rotation, so a file that cannot be decoded at all fails here.

    Args:
        path: the file.
        strict: if True (default), a decode error, a frame the decoder flags as corrupt, or a
            stream that ends before its container says it should (truncated file) raises
            :class:`InputError` naming the frame. If False, decoding goes on past damage (packets
            that fail are dropped, concealed frames are kept, a short stream just ends) with a
            warning, like the ``ffmpeg`` command line does.
        threads: decoder threads (0 = FFmpeg's choice).

    Attributes (besides :class:`VideoSource`'s): ``codec`` (decoder name), ``pix_fmt`` (stored
    pixel format), ``stored_size`` ((H, W) before rotation), ``orientation``
    (:class:`Orientation`), ``duration_seconds`` (or ``None``).

    Raises:
        InputError: the file cannot be opened, has no video stream, or no decodable frame.
    """

    def __init__(self, path: PathLike, *, strict: bool = True, threads: int = 0):
        self.path = Path(path)
        self.name = self.path.stem
        self.strict = bool(strict)
        self.threads = int(threads)
        self.video_id = None
        self._damaged = False
        container = self._open()
        try:
            stream = self._video_stream(container)
            self.codec = stream.codec_context.name
            self.fps = _rate(stream.average_rate) or _rate(stream.guessed_rate)
            self.num_frames = int(stream.frames) if stream.frames and stream.frames > 0 else None
            self.duration_seconds = self._expected_end(container, stream)
            frames = self._decode(container, stream)
            try:
                first = next(frames, None)
            finally:
                frames.close()
            if first is None:
                raise InputError(f"video '{self.path}' contains no decodable video frames; "
                                 f"check the file (it may be empty or still being written)")
            self.pix_fmt = first.format.name
            self.stored_size = (int(first.height), int(first.width))
            matrix = _frame_display_matrix(first)
            tag = _stream_rotate_tag(stream)
            if matrix is not None:
                self.orientation = orientation_from_display_matrix(matrix)
            elif tag is not None:
                self.orientation = orientation_from_rotate_tag(tag)
            else:
                self.orientation = Orientation()
            self.size = self.orientation.out_size(*self.stored_size)
        finally:
            container.close()

    # -- helpers --------------------------------------------------------------------------
    def _open(self):
        av = _import_av()
        if not self.path.exists():
            raise InputError(f"video '{self.path}' does not exist; check the path")
        if self.path.is_dir():
            raise InputError(f"'{self.path}' is a folder, not a video file")
        if self.path.stat().st_size == 0:
            raise InputError(f"video '{self.path}' is an empty file (0 bytes); "
                             f"re-copy or re-export it")
        try:
            return av.open(str(self.path), mode="r")
        except av.FFmpegError as exc:
            raise InputError(f"cannot open '{self.path}' as a video: {_one_line(exc)}; "
                             f"is it a video file FFmpeg can read?") from None
        except OSError as exc:
            raise InputError(f"cannot read '{self.path}': {_one_line(exc)}") from None

    def _video_stream(self, container):
        for stream in container.streams.video:
            disposition = getattr(stream, "disposition", None)
            # skip cover art (an attached picture is a 1-frame "video" stream)
            if disposition is not None and "attached_pic" in str(disposition).lower():
                continue
            stream.thread_type = "AUTO"
            stream.thread_count = self.threads
            return stream
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise InputError(f"'{self.path}' has no video stream (streams: {', '.join(kinds)}); "
                         f"pass a video file")

    @staticmethod
    def _expected_end(container, stream) -> Optional[float]:
        """Where the container says the video stream ends, in seconds (or None).

        Uses the stream's own duration, else its ``DURATION`` tag (Matroska), else the
        container's duration but only when no other audio/video stream could make it longer.
        """
        start = float(stream.start_time * stream.time_base) if (
            stream.start_time is not None and stream.time_base is not None) else 0.0
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            return start + float(stream.duration * stream.time_base)
        for key, value in dict(stream.metadata or {}).items():
            if key.lower() == "duration":
                m = re.fullmatch(r"\s*(\d+):(\d+):(\d+(?:\.\d+)?)\s*", str(value))
                if m:
                    return start + (int(m.group(1)) * 3600 + int(m.group(2)) * 60
                                    + float(m.group(3)))
        others = [s for s in container.streams if s.type in ("audio", "video") and s is not stream]
        if not others and container.duration is not None and container.duration > 0:
            c_start = container.start_time if container.start_time is not None else 0
            return float((c_start + container.duration) / 1_000_000)
        return None

    def _fail(self, n_good: int, what: str) -> InputError:
        return InputError(f"video '{self.path}' is truncated or corrupt: {what} at frame "
                          f"{n_good} (frames 0..{n_good - 1} decoded fine); {_REPAIR_HINT}")

    def _decode(self, container, stream) -> Iterator:
        """Yield av.VideoFrame in decoder order with the strict/lenient error policy."""
        av = _import_av()
        n_good = 0
        n_skipped = 0
        demux = container.demux(stream)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.FFmpegError as exc:
                if self.strict:
                    raise self._fail(n_good, f"reading failed ({_one_line(exc)})") from None
                n_skipped += 1
                break  # the demuxer cannot go on after a read error
            try:
                decoded = packet.decode()
            except av.FFmpegError as exc:
                if self.strict:
                    raise self._fail(n_good, f"decoding failed ({_one_line(exc)})") from None
                n_skipped += 1
                self._damaged = True
                continue
            for frame in decoded:
                if getattr(frame, "is_corrupt", False):
                    if self.strict:
                        raise self._fail(n_good, "the decoder flagged a corrupt frame")
                    n_skipped += 1
                self._damaged = self._damaged or n_skipped > 0
                n_good += 1
                yield frame
        if n_skipped:
            log.warning("%s: decoded past %d damaged packet(s)/corrupt frame(s) (lenient mode)",
                        self.path, n_skipped)

    def _check_complete(self, n: int, last_end: Optional[float]) -> None:
        """Raise if the stream stopped well before the container says it ends."""
        short_count = self.num_frames is not None and n < self.num_frames
        gap = None
        if self.duration_seconds is not None and last_end is not None and self.fps:
            gap = self.duration_seconds - last_end
        if gap is not None:
            truncated = gap > 2.5 / self.fps  # tolerance: rounding, edit lists, a held last frame
        else:
            truncated = short_count
        if truncated and not self.strict:  # lenient: the lost tail stays on the timeline
            total = self.num_frames
            if total is None and self.duration_seconds is not None and self.fps:
                total = int(round(self.duration_seconds * self.fps))
            if total is not None and total > self.timeline_frames:
                self.lost_frames.append((self.timeline_frames, total))
                self.timeline_frames = total
        if truncated:
            expected = (f"{self.num_frames} frames" if self.num_frames is not None
                        else f"{self.duration_seconds:.3f} s")
            what = (f"the stream breaks off at frame {n} (frames 0..{n - 1} decoded) but the "
                    f"container announces {expected}")
            if self.strict:
                raise InputError(f"video '{self.path}' is truncated or corrupt: {what}; "
                                 f"{_REPAIR_HINT}")
            log.warning("%s: %s (decoded what was there)", self.path, what)

    # -- public ---------------------------------------------------------------------------
    def iter_frames(self) -> Iterator[Frame]:
        """Decode every frame from the start.

        Yields:
            :class:`Frame` with ``rgb`` uint8 (H, W, 3) at :attr:`size` (a stream that changes
            resolution midway is rescaled to the first frame's size), ``pts_seconds`` = stored
            pts x time base (``index / fps`` if the frame has no pts).
        Raises:
            InputError: decoding fails or the stream is truncated (strict mode); the message
            names the first frame that could not be decoded.
        """
        container = self._open()
        self._damaged = False
        self.lost_frames = []
        self.timeline_frames = 0
        try:
            stream = self._video_stream(container)
            h0, w0 = self.stored_size
            index = 0      # decoded frames
            slot = -1      # timeline index of the previous frame
            prev_pts: Optional[float] = None
            last_end: Optional[float] = None
            for frame in self._decode(container, stream):
                stored = frame.pts is not None and frame.time_base is not None
                if stored:
                    pts = float(frame.pts * frame.time_base)
                elif last_end is not None:
                    pts = last_end
                elif self.fps:
                    pts = index / self.fps
                else:
                    pts = None
                # lenient mode, after damage: frames the decoder lost are placed by the
                # timestamps (a jump of k nominal frame durations = k - 1 lost frames), so
                # every later frame keeps its index on the video's timeline
                step = 1
                if self._damaged and stored and prev_pts is not None and self.fps:
                    step = max(1, int(round((pts - prev_pts) * self.fps)))
                if step > 1:
                    self.lost_frames.append((slot + 1, slot + step))
                slot += step
                prev_pts = pts if stored else prev_pts
                if (frame.height, frame.width) != (h0, w0):
                    rgb = frame.to_ndarray(format="rgb24", width=w0, height=h0)
                else:
                    rgb = frame.to_ndarray(format="rgb24")
                rgb = self.orientation.apply(rgb)
                if pts is not None:
                    dur = None
                    if getattr(frame, "duration", None) and frame.time_base is not None:
                        dur = float(frame.duration * frame.time_base)
                    last_end = pts + (dur if dur else (1.0 / self.fps if self.fps else 0.0))
                yield Frame(slot, pts, rgb)
                index += 1
                self.timeline_frames = slot + 1
            if index == 0:
                raise InputError(f"video '{self.path}' contains no decodable video frames")
            self._check_complete(index, last_end)
        finally:
            container.close()


# --------------------------------------------------------------------------------------------
# Frame folders / image lists (Pillow)
# --------------------------------------------------------------------------------------------

def natural_sort_key(name: str):
    """Sort key putting ``frame9.jpg`` before ``frame10.jpg`` (digit runs compare as numbers)."""
    parts = re.split(r"(\d+)", name)
    return tuple((int(p), p) if i % 2 else (p.lower(), p) for i, p in enumerate(parts))


def list_frame_files(folder: PathLike) -> List[Path]:
    """Image files of ``folder`` (not recursive, hidden files skipped), natural order.

    Raises:
        InputError: missing folder, or no image file in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"frame folder '{folder}' does not exist; check the path")
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    if not files:
        raise InputError(f"frame folder '{folder}' holds no image files "
                         f"({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}); pass a folder of frames "
                         f"or a video file")
    return sorted(files, key=lambda p: natural_sort_key(p.name))


def read_image_rgb(path: PathLike) -> np.ndarray:
    """One image file -> uint8 (H, W, 3) RGB with EXIF orientation applied.

    Follows detectron2 ``data/detection_utils.py::read_image`` (Pillow, exif transpose,
    ``convert("RGB")``), which is how the official code reads YouTube-VIS frames.

    Raises:
        InputError: the file is missing or not an image Pillow can decode.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with Image.open(path) as img:
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # broken EXIF block: keep the stored orientation
                pass
            return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
    except FileNotFoundError:
        raise InputError(f"frame '{path}' does not exist; check the path") from None
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError on truncated files, ...
        raise InputError(f"cannot read frame '{path}': {_one_line(exc)}; replace the file or "
                         f"remove it from the folder") from None


class ImageSequenceSource(VideoSource):
    """Frames stored as image files (one per frame), read with Pillow.

    Args:
        files: image paths in frame order.
        name: the video's name.
        fps: frame rate to attach (``pts_seconds = index / fps``), or None (``pts_seconds``
            None).
        video_id: dataset video id, if any.
        expected_size: (H, W) the dataset announces; checked against the first frame.
        path: the folder (for display).

    Raises:
        InputError: no files, a missing file, or a first frame whose size differs from
        ``expected_size``; while iterating, a frame of another size or an unreadable frame.
    """

    def __init__(self, files: Sequence[PathLike], *, name: str, fps: Optional[float] = None,
                 video_id: Optional[int] = None, expected_size: Optional[Tuple[int, int]] = None,
                 path: Optional[PathLike] = None):
        self.files = [Path(f) for f in files]
        self.name = name
        self.path = Path(path) if path is not None else None
        self.fps = _rate(fps) if fps is not None else None
        self.video_id = video_id
        self.num_frames = len(self.files)
        where = f"'{self.path}'" if self.path is not None else f"video '{name}'"
        if not self.files:
            raise InputError(f"{where} has no frames")
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise InputError(f"{where}: {len(missing)} of {len(self.files)} frame files are "
                             f"missing, first '{missing[0]}'; check the dataset root")
        first = read_image_rgb(self.files[0])
        self.size = (int(first.shape[0]), int(first.shape[1]))
        if expected_size is not None and tuple(int(v) for v in expected_size) != self.size:
            eh, ew = expected_size
            raise InputError(f"{where}: frame '{self.files[0]}' is {self.size[0]}x{self.size[1]} "
                             f"but the dataset says {eh}x{ew} (HxW); check the dataset json")

    def iter_frames(self) -> Iterator[Frame]:
        """Yield frames in file order: uint8 (H, W, 3) RGB; raises InputError on a bad frame."""
        for i, f in enumerate(self.files):
            rgb = read_image_rgb(f)
            if rgb.shape[:2] != self.size:
                raise InputError(f"frame {i} '{f}' is {rgb.shape[0]}x{rgb.shape[1]} but frame 0 "
                                 f"is {self.size[0]}x{self.size[1]}; all frames of a video must "
                                 f"have one size")
            yield Frame(i, (i / self.fps) if self.fps else None, rgb)


def open_source(path: PathLike, *, strict: bool = True, fps: Optional[float] = None,
                threads: int = 0) -> VideoSource:
    """Open a video file, a folder of frames or a single image.

    Args:
        path: a video file (anything FFmpeg reads), a folder of image frames
            (YouTube-VIS ``JPEGImages/<video>/``), or one image file (a 1-frame video).
        strict: video files only — see :class:`AVVideoSource`.
        fps: frame rate to attach to frame folders / images (ignored for video files, whose
            container gives it).
        threads: decoder threads for video files (0 = FFmpeg's choice).

    Returns:
        :class:`AVVideoSource` or :class:`ImageSequenceSource`.

    Raises:
        InputError: missing path, unreadable file, empty folder, no frames.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input '{p}' does not exist; pass a video file or a folder of frames")
    if p.is_dir():
        return ImageSequenceSource(list_frame_files(p), name=p.name, fps=fps, path=p)
    if p.suffix.lower() == ".json":
        raise InputError(f"'{p}' is a JSON file; pass a YouTube-VIS dataset with --ytvis-json "
                         f"and --ytvis-root, or a video file / frame folder")
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageSequenceSource([p], name=p.stem, fps=fps, path=p)
    return AVVideoSource(p, strict=strict, threads=threads)


# --------------------------------------------------------------------------------------------
# YouTube-VIS dataset json
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class YtvisVideo:
    """One video of a YouTube-VIS / OVIS dataset json.

    Attributes:
        id: the dataset's ``video_id`` (what results must carry).
        name: the frame folder name (parent of the first ``file_name``).
        file_names: absolute frame paths (root joined with the json's ``file_names``).
        height, width: as the json says (or None).
        length: number of frames.
    """

    id: int
    name: str
    file_names: Tuple[Path, ...]
    height: Optional[int]
    width: Optional[int]
    length: int

    def open(self, fps: Optional[float] = None) -> ImageSequenceSource:
        """The video's frames as a source (checks files exist and the first frame's size)."""
        size = (self.height, self.width) if self.height and self.width else None
        folder = self.file_names[0].parent if self.file_names else None
        return ImageSequenceSource(self.file_names, name=self.name, fps=fps, video_id=self.id,
                                   expected_size=size, path=folder)


def load_ytvis_videos(json_path: PathLike, root: PathLike) -> List[YtvisVideo]:
    """List the videos of a YouTube-VIS-format json (``videos[*].id/file_names/height/width``).

    Follows the official ``load_ytvis_json`` (``dvis_Plus/data_video/datasets/ytvis.py``):
    videos sorted by id, frame paths = ``root / file_name``, ``length`` frames.

    Args:
        json_path: e.g. ``ytvis_2019/valid.json`` or OVIS ``annotations_valid.json``.
        root: the image root (e.g. ``ytvis_2019/valid/JPEGImages``).

    Raises:
        InputError: missing/invalid json, no ``videos`` list, a video without ``id`` or
        ``file_names``, or a missing root folder.
    """
    json_path, root = Path(json_path), Path(root)
    if not json_path.is_file():
        raise InputError(f"YouTube-VIS json '{json_path}' does not exist; check --ytvis-json")
    if not root.is_dir():
        raise InputError(f"YouTube-VIS image root '{root}' is not a folder; check --ytvis-root")
    try:
        with open(json_path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read YouTube-VIS json '{json_path}': {_one_line(exc)}") from None
    videos = data.get("videos") if isinstance(data, dict) else None
    if not isinstance(videos, list):
        raise InputError(f"'{json_path}' has no 'videos' list; is it a YouTube-VIS/OVIS "
                         f"annotation file?")
    out: List[YtvisVideo] = []
    from .validate import check_ytvis_video  # ids, file names, lengths: one line each
    seen_ids = set()
    for k, v in enumerate(videos):
        if not isinstance(v, dict) or "id" not in v or not v.get("file_names"):
            raise InputError(f"'{json_path}': videos[{k}] lacks 'id' or 'file_names'")
        check_ytvis_video(v, k, f"'{json_path}'")
        if v["id"] in seen_ids:
            raise InputError(f"'{json_path}': video id {v['id']} appears twice; ids must be "
                             "unique (results are keyed by them)")
        seen_ids.add(v["id"])
        names = list(v["file_names"])
        length = int(v.get("length") or len(names))
        names = names[:length]
        folder = Path(names[0]).parent.name or str(v["id"])
        out.append(YtvisVideo(
            id=int(v["id"]), name=folder,
            file_names=tuple(root / n for n in names),
            height=int(v["height"]) if v.get("height") else None,
            width=int(v["width"]) if v.get("width") else None,
            length=length))
    out.sort(key=lambda x: x.id)
    return out


# --------------------------------------------------------------------------------------------
# Background decoding
# --------------------------------------------------------------------------------------------

_FRAME, _END, _ERROR = 0, 1, 2


def _queue_put(q: "queue.Queue", stop: threading.Event, item) -> bool:
    """Blocking put that gives up (False) once ``stop`` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(factory: Callable[[], Iterable[Frame]], q: "queue.Queue",
             stop: threading.Event) -> None:
    """Decode thread body: frames, then an end marker or the exception that stopped it."""
    it = None
    try:
        it = iter(factory())
        for frame in it:
            if not _queue_put(q, stop, (_FRAME, frame)):
                return
        _queue_put(q, stop, (_END, None))
    except BaseException as exc:  # handed to the consumer
        _queue_put(q, stop, (_ERROR, exc))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()  # runs the source's cleanup (closes the container) in this thread
            except Exception:  # pragma: no cover - best effort cleanup
                log.debug("closing the frame iterator failed", exc_info=True)


class Prefetcher:
    """Iterator over frames decoded by a background thread into a bounded queue.

    At most ``max_queue`` decoded frames wait in the queue (plus one the decoder holds while
    it waits for room), so memory stays bounded however slow the consumer is. An exception in
    the decoder (e.g. :class:`InputError` for a corrupt file) is raised in the consumer after
    the frames decoded before it. :meth:`close` (also via ``with``, or garbage collection)
    stops the thread and closes the source's iterator in that thread (the container is closed).
    """

    def __init__(self, frames: Union[VideoSource, Callable[[], Iterable[Frame]], Iterable[Frame]],
                 max_queue: int = 8):
        if int(max_queue) < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if hasattr(frames, "iter_frames"):
            factory = frames.iter_frames
        elif callable(frames):
            factory = frames
        else:
            factory = lambda: iter(frames)  # noqa: E731
        self.max_queue = int(max_queue)
        self._factory = factory
        self._queue: "queue.Queue" = queue.Queue(maxsize=self.max_queue)
        self._stop = threading.Event()
        self._finished = False
        # the thread gets no reference to self, so an abandoned Prefetcher can be collected
        # (its __del__ then stops the thread)
        self._thread = threading.Thread(target=_produce, name="dvis-trt-decode", daemon=True,
                                        args=(factory, self._queue, self._stop))
        self._thread.start()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Frame:
        if self._finished:
            raise StopIteration
        kind, payload = self._queue.get()
        if kind == _FRAME:
            return payload
        self._finished = True
        self._thread.join()
        if kind == _ERROR:
            raise payload
        raise StopIteration

    def close(self) -> None:
        """Stop decoding, drop queued frames, join the thread. Idempotent."""
        self._finished = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the decode thread is still running."""
        return self._thread.is_alive()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:
            pass


def prefetch(source: Union[VideoSource, Callable[[], Iterable[Frame]], Iterable[Frame]],
             max_queue: int = 8) -> Prefetcher:
    """Decode ``source`` in a background thread; iterate the result in the consumer.

    Args:
        source: a :class:`VideoSource` (its :meth:`~VideoSource.iter_frames` runs in the
            thread), a callable returning an iterable of frames, or an iterable.
        max_queue: how many decoded frames may wait (>= 1).

    Returns:
        :class:`Prefetcher` (an iterator and context manager). Use
        ``with prefetch(src) as frames: for f in frames: ...`` so an early ``break`` stops
        the thread at once.
    """
    return Prefetcher(source, max_queue=max_queue)
