"""Live sources for ``dvis-trt stream``: what a source is, its reader thread and the frame queue.

:class:`LiveSource` reads a camera (``/dev/videoN``, the ``v4l2`` demuxer), a network stream
(rtsp/rtmp/http/https/udp/tcp/srt URLs, reopened with exponential back-off) or a file (paced by
its timestamps unless ``realtime=False``) with PyAV into a :class:`FrameQueue`, whose drop policy
(:data:`DROP_POLICIES`) decides what happens when inference is slower than the source; every
dropped frame is counted in :class:`StreamStats`. The loop is in :mod:`dvis_trt.runtime.stream`.
"""
from __future__ import annotations

import collections
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Union

import numpy as np

from dvis_trt.errors import InputError


DROP_POLICIES = ("drop-oldest", "drop-newest", "block")
NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt", "rtp")

PathLike = Union[str, os.PathLike]


def source_kind(spec: PathLike) -> str:
    """``"url"`` (a network URL), ``"device"`` (``/dev/video*``) or ``"file"``."""
    text = os.fspath(spec)
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", text)
    if m:
        if m.group(1).lower() in NETWORK_SCHEMES:
            return "url"
        if m.group(1).lower() == "file":
            return "file"
        raise InputError(f"source {text!r}: unsupported URL scheme {m.group(1)!r}; use one of "
                         f"{', '.join(NETWORK_SCHEMES)}, a /dev/video* camera or a file")
    if text.startswith("/dev/video"):
        return "device"
    return "file"


@dataclass
class SourceFrame:
    """A frame from a live source: ``index`` counts every frame taken from the source (across
    reconnects, dropped ones included), ``timestamp`` is the source's presentation time in
    seconds (``None`` when unknown), ``arrival`` the ``time.monotonic()`` it was decoded."""

    index: int
    timestamp: Optional[float]
    rgb: np.ndarray
    arrival: float


@dataclass
class StreamStats:
    """Counters of a stream session. Latencies are frame arrival -> result, in seconds (the
    last ``window`` results, for the percentiles)."""

    frames_in: int = 0
    frames_done: int = 0
    dropped: int = 0
    reconnects: int = 0
    errors: List[str] = field(default_factory=list)
    latencies: Deque[float] = field(default_factory=lambda: collections.deque(maxlen=4096))
    service_max: float = 0.0   # longest time one frame kept the inference loop busy, seconds
    started: float = field(default_factory=time.monotonic)

    def percentile(self, q: float) -> Optional[float]:
        if not self.latencies:
            return None
        return float(np.percentile(np.asarray(self.latencies), q))

    def summary(self) -> str:
        wall = time.monotonic() - self.started
        p50, p99 = self.percentile(50), self.percentile(99)
        lat = "" if p50 is None else f", latency p50 {p50 * 1e3:.0f} ms p99 {p99 * 1e3:.0f} ms"
        return (f"{self.frames_done} frames processed, {self.dropped} dropped of "
                f"{self.frames_in} read, {self.reconnects} reconnects, "
                f"{self.frames_done / max(wall, 1e-9):.2f} frames/s{lat}")


class FrameQueue:
    """A bounded hand-over queue between the reader and the inference loop with a drop policy
    (see the module docstring). Thread-safe; ``close()`` wakes every waiter."""

    def __init__(self, size: int, policy: str, stats: StreamStats):
        if policy not in DROP_POLICIES:
            raise InputError(f"drop policy {policy!r}: use one of {', '.join(DROP_POLICIES)}")
        if int(size) < 1:
            raise InputError(f"queue size must be >= 1, got {size}")
        self.size, self.policy, self.stats = int(size), policy, stats
        self._q: Deque[SourceFrame] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False

    def put(self, item: SourceFrame, stop: threading.Event) -> bool:
        """Hand over one frame; False when the queue was closed (stop reading)."""
        with self._cv:
            while len(self._q) >= self.size and not self._closed:
                if self.policy == "drop-oldest":
                    self._q.popleft()
                    self.stats.dropped += 1
                elif self.policy == "drop-newest":
                    self.stats.dropped += 1
                    return True
                else:
                    self._cv.wait(0.1)
                    if stop.is_set():
                        return False
            if self._closed:
                return False
            self._q.append(item)
            self._cv.notify_all()
            return True

    def get(self) -> Optional[SourceFrame]:
        """The next frame, or None once the queue is closed and empty."""
        with self._cv:
            while not self._q and not self._closed:
                self._cv.wait(0.1)
            if not self._q:
                return None
            item = self._q.popleft()
            self._cv.notify_all()
            return item

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class LiveSource:
    """Frames of a file, camera or network stream, read with PyAV (see the module docstring).

    Args:
        spec: path, ``/dev/videoN`` or URL.
        realtime: pace a file by its timestamps (default True for files; live sources pace
            themselves).
        reconnect: reopen a dropped source with back-off (default: True for URLs only).
        max_reconnects: failed attempts in a row before giving up (None: forever).
        backoff, backoff_max: first and largest wait between attempts, seconds.
        timeout: seconds to wait when opening / reading a network source before it counts as
            dropped.
        options: extra FFmpeg options for ``av.open`` (e.g. ``{"rtsp_transport": "tcp"}``).
    """

    def __init__(self, spec: PathLike, *, realtime: Optional[bool] = None,
                 reconnect: Optional[bool] = None, max_reconnects: Optional[int] = None,
                 backoff: float = 0.5, backoff_max: float = 10.0, timeout: float = 5.0,
                 options: Optional[Dict[str, str]] = None):
        self.spec = os.fspath(spec)
        self.kind = source_kind(self.spec)
        if self.kind == "file":
            path = Path(self.spec[7:] if self.spec.startswith("file://") else self.spec)
            if not path.is_file():
                raise InputError(f"source {self.spec}: no such file (give a video file, a "
                                 "/dev/video* camera or a stream URL)")
            self.spec = str(path)
        self.realtime = (self.kind == "file") if realtime is None else bool(realtime)
        self.reconnect = (self.kind == "url") if reconnect is None else bool(reconnect)
        self.max_reconnects = max_reconnects
        self.backoff, self.backoff_max = float(backoff), float(backoff_max)
        self.timeout = float(timeout)
        self.options = dict(options or {})
        self.fps: Optional[float] = None

    def _open(self):
        from .video.av_source import _import_av

        av = _import_av()
        kw: Dict[str, Any] = {"options": self.options}
        if self.kind == "device":
            kw["format"] = "v4l2"
        if self.kind != "file":
            kw["timeout"] = (self.timeout, self.timeout)
        return av.open(self.spec, **kw)

    def _session(self, stop: threading.Event) -> Iterator[tuple]:
        """(pts seconds or None, rgb) of one connection, until it ends or fails."""
        container = self._open()
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else self.fps
            for frame in container.decode(stream):
                if stop.is_set():
                    return
                pts = float(frame.time) if frame.time is not None else None
                yield pts, frame.to_ndarray(format="rgb24")
        finally:
            container.close()

    def frames(self, stop: threading.Event, stats: StreamStats) -> Iterator[SourceFrame]:
        """Every frame until the source ends for good or ``stop`` is set."""
        index = 0
        failures = 0
        while not stop.is_set():
            t0 = pts0 = None
            got = 0
            try:
                for pts, rgb in self._session(stop):
                    if self.realtime and pts is not None:
                        if t0 is None:
                            t0, pts0 = time.monotonic(), pts
                        wait = (pts - pts0) - (time.monotonic() - t0)
                        if wait > 0 and stop.wait(wait):
                            return
                    got += 1
                    failures = 0
                    stats.frames_in += 1
                    yield SourceFrame(index, pts, np.ascontiguousarray(rgb), time.monotonic())
                    index += 1
                    if stop.is_set():
                        return
                if not self.reconnect:
                    return
                why = "ended"
            except InputError:
                raise
            except Exception as exc:  # av.error.*, OSError: the source dropped or is not there
                why = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                if not self.reconnect:
                    if got or index:
                        stats.errors.append(why)
                        return
                    raise InputError(f"cannot read {self.spec}: {why}") from None
            failures += 1 if not got else 0
            if self.max_reconnects is not None and failures > self.max_reconnects:
                stats.errors.append(f"{self.spec}: gave up after {self.max_reconnects} "
                                    f"reconnect attempts ({why})")
                return
            delay = min(self.backoff_max, self.backoff * (2 ** max(failures - 1, 0)))
            if stop.wait(delay):
                return
            stats.reconnects += 1
