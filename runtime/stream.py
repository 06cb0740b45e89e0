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

import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Union

import numpy as np

from dvis_trt.errors import InputError

from .stream_sources import DROP_POLICIES, FrameQueue, LiveSource, PathLike, StreamStats
from .stream_sinks import JsonlSink, OverlaySink, _claim


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
