"""Video files through PyAV (FFmpeg): rotation metadata, pixel formats, strict/lenient decoding."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from dvis_trt.errors import InputError

from .base import _REPAIR_HINT, Frame, VideoSource, _one_line, _rate

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


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
        from dvis_trt.errors import DependencyError
        raise DependencyError("reading videos needs PyAV; install it (pip install av)") from exc
    return av


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
