"""The tracing hook of the pipelines: named spans per phase.

A pipeline (:class:`~dvis_trt.runtime.pipeline.OfflinePipeline`, the eager
``DvisDaqOffline``) wraps each phase of its work in ``with tracer.span(name):``. The default
:data:`NULL_TRACER` does nothing (a shared no-op context manager: no timing, no allocation).
``dvis-trt bench`` and ``benchmarks/host_overhead.py`` pass a :class:`SpanTimer`, which sums the
seconds spent in each span name; nobody patches module globals.

Span names are ``group`` or ``group.phase``; the group is the bench's stage group:

==============  ==============================================================================
name            what
==============  ==============================================================================
preprocess      resize (Pillow), normalise, pad (``preprocess.resize``, ``preprocess.normalize``)
segmenter       the segmenter stage call
tracker         per frame: ``tracker.scores`` (validity), ``tracker.match`` (Hungarian slot
                match), ``tracker.hub_update``; the tracker stage calls inside it
select          ``select.noise_filter`` (track grouping, top-K), ``select.link`` (frame link)
refiner         the refiner stage call
finalize        mask head, ``finalize.mask_resize``, ``finalize.rle``
engine.<stage>  inside a backend call of that stage (nested in the phases above)
==============  ==============================================================================

Spans nest; a :class:`SpanTimer` charges each span its own wall time (so ``tracker`` includes
``engine.tracker_step``). ``sync`` (e.g. ``torch.cuda.synchronize``) runs at both ends of every
span so asynchronous GPU work lands in the right one.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Collection, ContextManager, Dict, Optional

__all__ = ["Tracer", "NULL_TRACER", "SpanTimer"]

_NULL = contextlib.nullcontext()


class Tracer:
    """No-op tracer (the default). Subclasses override :meth:`span`."""

    def span(self, name: str) -> ContextManager[None]:
        """A context manager around one phase named ``name``."""
        return _NULL


NULL_TRACER = Tracer()


class SpanTimer(Tracer):
    """Sums wall seconds and counts per span name.

    Attributes:
        totals: name -> seconds (float), summed over every span of that name.
        counts: name -> number of spans.
        cpu: name -> CPU seconds of the calling thread (only with ``cpu=True``; what other
            processes on a shared machine do not inflate).
    """

    def __init__(self, sync: Optional[Callable[[], None]] = None, cpu: bool = False,
                 sync_spans: Optional[Collection[str]] = None):
        self.sync = sync
        #: names of the spans ``sync`` runs around (None: every span)
        self.sync_spans = None if sync_spans is None else frozenset(sync_spans)
        self.totals: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}
        self.cpu: Dict[str, float] = {}
        self._cpu = bool(cpu)

    @contextlib.contextmanager
    def span(self, name: str):
        sync = self.sync
        if sync is not None and self.sync_spans is not None and name not in self.sync_spans:
            sync = None
        if sync is not None:
            sync()
        c0 = time.thread_time() if self._cpu else 0.0
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync is not None:
                sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
            self.counts[name] = self.counts.get(name, 0) + 1
            if self._cpu:
                self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c0

    def total(self, name: str) -> float:
        """Seconds spent in spans called ``name`` (0.0 if none)."""
        return self.totals.get(name, 0.0)

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
        self.cpu.clear()
