"""Background decoding into a bounded queue; decode errors re-raised in the consumer."""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Callable, Iterable, Union



from .base import Frame, VideoSource

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


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
