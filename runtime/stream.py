"""Live sources in, per-frame results out: ``dvis-trt stream`` and ``dvis_trt.stream(...)``.

A reader thread takes frames from the source at the source's pace (a camera or a network
stream paces itself; a file is paced by its timestamps, like ``ffmpeg -re``, unless
``realtime=False``) into a small queue; the inference loop takes them from the queue. When
inference is slower than the source the queue fills and the drop policy decides:

* ``drop-oldest`` (default): the oldest waiting frame is dropped, so the next frame processed is
  always the freshest one — latency stays bounded by about (queue + 1) x the inference time;
* ``drop-newest``: arriving frames are dropped while the queue is full;
* ``block``: nothing is dropped, the reader waits (latency grows without bound on a live
  source; the right choice for files processed as fast as possible, ``realtime=False``).

Every dropped frame is counted (:class:`StreamStats`). Network sources (rtsp/rtmp/http/https/
udp/tcp/srt URLs) that drop or end are reopened with exponential back-off (``backoff`` start,
doubled up to ``backoff_max``; ``max_reconnects`` attempts in a row, ``None`` = forever); frame
indices keep counting across reconnects. A stop request (SIGINT/SIGTERM in the CLI, or
:meth:`StreamSession.close`) ends the loop after the current frame; sinks are closed in every
case.

Sources are opened with PyAV (FFmpeg's libraries): ``/dev/videoN`` with the ``v4l2`` demuxer,
URLs with FFmpeg's protocol handlers (``tcp://host:port``, ``udp://@:port``, ``rtsp://...``),
anything else as a file.
"""
from __future__ import annotations

import collections
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, TextIO, Union

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


# --------------------------------------------------------------------------------------------
# sinks
# --------------------------------------------------------------------------------------------
def _claim(path: PathLike, what: str) -> Path:
    """Refuse an output path that exists (a user's file is never written over)."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        raise InputError(f"{what} {p} exists; dvis-trt never writes over a file it did not "
                         "make: choose a new name or remove it")
    if not p.parent.is_dir():
        raise InputError(f"{what} {p}: folder {p.parent} does not exist")
    return p


class JsonlSink:
    """JSON Lines, one record per frame (:meth:`FrameResult.to_json`), to stdout (``"-"``) or a
    new file. A file is created exclusively (never over an existing one) and every record is
    one ``write`` of a whole line, flushed at once: a reader tailing the file sees whole lines,
    and a stopped stream leaves a valid file with every finished frame."""

    def __init__(self, target: Union[PathLike, TextIO] = "-", include_invalid: bool = False,
                 class_names: Optional[Sequence[str]] = None):
        import sys

        self.include_invalid, self.class_names = include_invalid, class_names
        self._own = False
        if target == "-":
            self._f = sys.stdout
        elif hasattr(target, "write"):
            self._f = target
        else:
            p = _claim(target, "--jsonl output")
            self._f = open(p, "x", encoding="utf-8")
            self._own = True

    def write(self, result) -> None:
        import json

        self._f.write(json.dumps(result.to_json(self.include_invalid, self.class_names),
                                 separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._own and not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class OverlaySink:
    """The processed frames with masks, track ids, classes and scores drawn, encoded to a new
    video file. Written to a temporary file beside the target and renamed when the stream
    stops (a video is unreadable before its trailer is written). A failure of the overlay
    costs only the overlay: it is reported once and the stream goes on."""

    def __init__(self, path: PathLike, fps: Optional[float] = None,
                 class_names: Optional[Sequence[str]] = None, min_score: float = 0.3):
        self.path = _claim(path, "--overlay output")
        self.fps = fps or 25.0
        self.class_names, self.min_score = class_names, float(min_score)
        from dvis_trt.outputs import temp_path

        self._tmp = temp_path(self.path)  # beside the target: the final rename is atomic
        self._out = self._stream = None
        self.failed: Optional[str] = None

    def write(self, result, rgb: np.ndarray) -> None:
        if self.failed:
            return
        try:
            self._write(result, rgb)
        except Exception as exc:  # the overlay is secondary: keep the stream going
            self.failed = f"{type(exc).__name__}: {exc}"
            self._abort()

    def _write(self, result, rgb: np.ndarray) -> None:
        from fractions import Fraction

        from .overlay import render_overlay_frame, track_color
        from .results import decode_rle
        from .video.av_source import _import_av

        av = _import_av()
        if self._out is None:
            from .overlay import _pick_encoder

            codec, pix_fmt, opts = _pick_encoder(self.path.suffix.lower())
            self._out = av.open(str(self._tmp), mode="w")
            self._stream = self._out.add_stream(codec, rate=Fraction(self.fps).limit_denominator(
                1001))
            self._stream.width, self._stream.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
            self._stream.pix_fmt = pix_fmt
            if opts:
                self._stream.options = opts
        keep = [k for k in range(len(result.track_ids))
                if result.valid[k] and result.scores[k] >= self.min_score]
        masks = decode_rle([result.rles[k] for k in keep]) if keep else []
        names = self.class_names
        texts = [f"{int(result.track_ids[k])} "
                 f"{names[int(result.labels[k])] if names else int(result.labels[k]) + 1} "
                 f"{float(result.scores[k]):.2f}" for k in keep]
        img = render_overlay_frame(rgb, list(masks), [track_color(int(result.track_ids[k]))
                                                      for k in keep], texts)
        h, w = self._stream.height, self._stream.width
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:h, :w]), format="rgb24")
        for packet in self._stream.encode(frame):
            self._out.mux(packet)

    def _abort(self) -> None:
        try:
            if self._out is not None:
                self._out.close()
        except Exception:
            pass
        self._out = None
        if self._tmp.exists():
            self._tmp.unlink()

    def close(self) -> None:
        if self._out is None:
            return
        try:
            for packet in self._stream.encode():
                self._out.mux(packet)
            self._out.close()
            self._out = None
            if self.path.exists():  # appeared meanwhile: still never written over
                raise InputError(f"--overlay output {self.path} appeared while streaming; the "
                                 f"overlay is left in {self._tmp}")
            os.replace(self._tmp, self.path)
        except InputError:
            raise
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            self._abort()


# --------------------------------------------------------------------------------------------
# the session
# --------------------------------------------------------------------------------------------
def open_pipeline(bundle: PathLike, mode: str = "online", *, backend: Any = "auto",
                  threads: Optional[int] = None, clip_frames: int = 15, window: int = 5,
                  providers: Optional[str] = None, checkpoint: Optional[PathLike] = None,
                  config_file: Optional[PathLike] = None, keep_masks: bool = False,
                  all_masks: bool = False):
    """(pipeline, runner) for ``mode`` ``online`` or ``near-online`` on a bundle.

    ``online`` needs the ``tracker_masks`` stage (bundles exported by this dvis-trt, from an
    offline or an online checkpoint); ``near-online`` the offline stages (refiner, mask_head).
    Raises InputError / BundleError / DependencyError with one line.
    """
    from dvis_trt.errors import BundleError
    from .bundle import ONLINE_STAGE_NAMES, STAGE_NAMES, load_manifest
    from .online import NearOnlinePipeline, OnlinePipeline
    from .runner import Runner

    if mode not in ("online", "near-online"):
        raise InputError(f"--mode must be online or near-online, got {mode!r}")
    manifest = load_manifest(bundle, require_stages=())
    need = ONLINE_STAGE_NAMES if mode == "online" else STAGE_NAMES
    missing = [s for s in need if s not in manifest.stages]
    if missing:
        if mode == "online" and missing == ["tracker_masks"]:
            raise BundleError(f"bundle {manifest.root} has no 'tracker_masks' stage (exported "
                              "before the online mode existed): re-export it with `dvis-trt "
                              "export` to use --mode online (near-online works with it)")
        raise BundleError(f"bundle {manifest.root} lacks the stages {missing} that --mode {mode} "
                          "needs" + (" (an online checkpoint's bundle serves --mode online only)"
                                     if mode != "online" else ""))
    # load only what the mode runs
    from dataclasses import replace
    manifest = replace(manifest, stages={k: v for k, v in manifest.stages.items() if k in need})
    runner = Runner(manifest, backend, threads=threads, window=window, quiet=True,
                    providers=providers, checkpoint=checkpoint, config_file=config_file)
    constants = {"bg_slots": runner.pipeline.bg_slots,
                 "seg_query_feat": runner.pipeline.seg_query_feat}
    if mode == "online":
        pipe = OnlinePipeline(runner.backend, runner.settings, constants,
                              upsampler=runner.pipeline.upsampler, keep_masks=keep_masks,
                              all_masks=all_masks)
    else:
        pipe = NearOnlinePipeline(runner.backend, runner.settings, constants,
                                  clip_frames=clip_frames, upsampler=runner.pipeline.upsampler,
                                  window=window, keep_masks=keep_masks)
    return pipe, runner


class StreamSession:
    """An iterable of :class:`~dvis_trt.runtime.online.FrameResult` over a live source (see
    :func:`stream`). Iterate once; :meth:`close` (or leaving a ``with`` block, or a stop
    request) ends it; :attr:`stats` has the counters."""

    def __init__(self, pipeline, source: LiveSource, *, queue_size: int = 1,
                 drop: str = "drop-oldest", max_frames: Optional[int] = None,
                 throttle: float = 0.0, sinks: Sequence[Any] = (),
                 on_close: Optional[Callable[[], None]] = None,
                 stop_event: Optional[threading.Event] = None):
        self.pipeline, self.source = pipeline, source
        self.stats = StreamStats()
        if not source.realtime and source.kind == "file":
            drop = "block"  # a file read as fast as possible: every frame, none dropped
        self.queue = FrameQueue(queue_size, drop, self.stats)
        self.max_frames = max_frames
        self.throttle = float(throttle)
        self.sinks = list(sinks)
        self.stop_event = stop_event or threading.Event()
        self._on_close = on_close
        self._reader: Optional[threading.Thread] = None
        self._reader_error: Optional[BaseException] = None
        self._closed = False

    def _read(self) -> None:
        try:
            for item in self.source.frames(self.stop_event, self.stats):
                if not self.queue.put(item, self.stop_event):
                    break
                if self.max_frames is not None and item.index + 1 >= self.max_frames:
                    break
        except BaseException as exc:  # surfaced by the consumer
            self._reader_error = exc
        finally:
            self.queue.close()

    def stop(self) -> None:
        """Ask the session to end after the current frame (signal-handler safe)."""
        self.stop_event.set()
        self.queue.close()

    def __iter__(self) -> Iterator[Any]:
        if self._reader is not None:
            raise RuntimeError("a StreamSession can be iterated once")
        self._reader = threading.Thread(target=self._read, name="dvis-trt-source", daemon=True)
        self._reader.start()
        near = hasattr(self.pipeline, "push")
        pending: Dict[int, np.ndarray] = {}
        try:
            while not self.stop_event.is_set():
                item = self.queue.get()
                if item is None:
                    break
                t0 = time.monotonic()
                if near:
                    results = self.pipeline.push(item.rgb, item.index, item.timestamp,
                                                 item.arrival)
                    if any(hasattr(s, "write") and isinstance(s, OverlaySink) for s in self.sinks):
                        pending[item.index] = item.rgb
                else:
                    results = [self.pipeline.process(item.rgb, item.index, item.timestamp,
                                                     item.arrival)]
                if self.throttle:  # a slower model, for tests and capacity planning
                    left = self.throttle - (time.monotonic() - t0)
                    if left > 0:
                        time.sleep(left)
                        for r in results:
                            r.done = time.monotonic()
                self.stats.service_max = max(self.stats.service_max, time.monotonic() - t0)
                yield from self._emit(results, item.rgb if not near else None, pending)
            if self._reader_error is not None:
                raise self._reader_error
            if near and not self.stop_event.is_set():
                yield from self._emit(self.pipeline.flush(), None, pending)
        finally:
            self.close()

    def _emit(self, results, rgb, pending):
        for r in results:
            self.stats.frames_done += 1
            if r.latency is not None:
                self.stats.latencies.append(r.latency)
            for s in self.sinks:
                if isinstance(s, OverlaySink):
                    if s._out is None and self.source.fps:
                        s.fps = self.source.fps
                    s.write(r, rgb if rgb is not None else pending.pop(r.index))
                else:
                    s.write(r)
            yield r

    def close(self) -> None:
        """Stop reading, close every sink (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._reader is not None:
            self._reader.join(timeout=self.source.timeout + 1.0)
        errors = []
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:
                errors.append(exc)
        if self._on_close:
            self._on_close()
        if errors:
            raise errors[0]

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream(bundle: PathLike, source: PathLike, *, mode: str = "online", clip_frames: int = 15,
           backend: Any = "auto", threads: Optional[int] = None, queue_size: Optional[int] = None,
           drop: str = "drop-oldest", realtime: Optional[bool] = None,
           reconnect: Optional[bool] = None, max_reconnects: Optional[int] = None,
           backoff: float = 0.5, backoff_max: float = 10.0, timeout: float = 5.0,
           max_frames: Optional[int] = None, throttle: float = 0.0,
           jsonl: Union[PathLike, TextIO, None] = None, overlay: Optional[PathLike] = None,
           include_invalid: bool = False, keep_masks: bool = False,
           options: Optional[Dict[str, str]] = None, **backend_options) -> StreamSession:
    """Per-frame results of a bundle over a live source::

        for result in dvis_trt.stream("bundle/", "rtsp://camera/stream"):
            for inst in result.instances():
                print(result.index, inst["track_id"], inst["class"], inst["score"], inst["box"])

    Args:
        bundle: bundle folder. source: file, ``/dev/videoN`` or URL (see :func:`source_kind`).
        mode: ``online`` (a result per frame, as soon as it is done) or ``near-online``
            (the offline model over clips of ``clip_frames`` frames; results of a clip when
            it closes).
        backend, threads, ``providers=``, ``checkpoint=``, ``config_file=``: as ``dvis-trt run``.
        queue_size: frames waiting for inference (default 1 online, ``clip_frames``
            near-online); drop: ``drop-oldest`` / ``drop-newest`` / ``block``.
        realtime: pace a file by its timestamps (default True); False reads it as fast as
            inference goes, nothing dropped.
        reconnect, max_reconnects, backoff, backoff_max, timeout: network sources (see
            :class:`LiveSource`). max_frames: stop after this many source frames.
        throttle: at least this many seconds per frame (simulates a slower model).
        jsonl: also write JSON Lines there (path, ``"-"`` = stdout, or a text file object).
        overlay: also write an overlay video there (a new file).
        include_invalid: also masks for tracks in their grace period, and JSON records list
            them (``valid``); default: those tracks carry an empty mask and are not written.
        keep_masks: results carry dense masks (``result.masks``) besides the RLEs.
        options: FFmpeg options for opening the source.
    Returns:
        a :class:`StreamSession` (iterate it; ``.stats`` has the counters).
    Raises:
        InputError / BundleError / DependencyError with one line.
    """
    live = LiveSource(source, realtime=realtime, reconnect=reconnect,
                      max_reconnects=max_reconnects, backoff=backoff, backoff_max=backoff_max,
                      timeout=timeout, options=options)
    if drop not in DROP_POLICIES:
        raise InputError(f"--drop must be one of {', '.join(DROP_POLICIES)}, got {drop!r}")
    if max_frames is not None and int(max_frames) < 1:
        raise InputError(f"--max-frames must be >= 1, got {max_frames}")
    if throttle < 0 or not math.isfinite(throttle):
        raise InputError(f"--throttle must be a number of seconds >= 0, got {throttle}")
    from dvis_trt.outputs import check_outputs

    file_out = jsonl if jsonl is not None and jsonl != "-" and not hasattr(jsonl, "write") \
        else None
    check_outputs([("--jsonl", file_out), ("--overlay", overlay)],
                  [("BUNDLE", bundle)] + ([("SOURCE", live.spec)] if live.kind != "url" else []))
    for label, out in (("--jsonl", file_out), ("--overlay", overlay)):
        if out is not None:
            _claim(out, f"{label} output")
    if overlay is not None:  # the overlay temporaries of a killed stream (kill -9, power cut)
        from dvis_trt.outputs import clean_stale_temps
        clean_stale_temps(Path(overlay).absolute().parent)
    sinks: List[Any] = []
    pipe, runner = open_pipeline(bundle, mode, backend=backend, threads=threads,
                                 clip_frames=clip_frames, keep_masks=keep_masks,
                                 all_masks=include_invalid, **backend_options)
    try:
        names = runner.class_names
        if jsonl is not None:
            sinks.append(JsonlSink(jsonl, include_invalid=include_invalid, class_names=names))
        if overlay is not None:
            from .cli_run import OVERLAY_SUFFIXES
            if Path(overlay).suffix.lower() not in OVERLAY_SUFFIXES:
                raise InputError(f"--overlay {overlay}: use one of {', '.join(OVERLAY_SUFFIXES)}")
            sinks.append(OverlaySink(overlay, fps=None, class_names=names))
    except BaseException:
        for s in sinks:
            s.close()
        runner.close()
        raise
    size = queue_size if queue_size is not None else (1 if mode == "online" else clip_frames)
    return StreamSession(pipe, live, queue_size=size, drop=drop, max_frames=max_frames,
                         throttle=throttle, sinks=sinks, on_close=runner.close)
