"""What a benchmark row runs: :class:`EagerRunner` (the eager baseline) and
:class:`PipelineRunner` (the runtime pipeline on a backend from the registry), each returning a
:class:`RunOutput` with the final instances, the per-stage-group times and the engine/host split;
:func:`alternate` runs them in A/B/... rounds with the order reversed every round."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dvis_trt.errors import BundleError, DependencyError, InputError

from dvis_trt.runtime.bundle import STAGE_NAMES, load_constants

from .parity import Instances


SCHEMA = "dvis-trt-bench/1"
STAGE_GROUPS = ("preprocess", "segmenter", "tracker", "select", "refiner", "finalize", "other")
ENGINE_STAGES = STAGE_NAMES
#: backend name -> one-line description (``--backends``)
BACKENDS = {
    "torch": "eager PyTorch DvisDaqOffline, fp32, CPU (the baseline and parity reference)",
    "torch-stages": "eager PyTorch stage modules through the runtime pipeline (CUDA if present)",
    "torch-fp16": "eager stage modules under torch.autocast(float16) on CUDA (GPU only)",
    "torch-compile": "torch.compile'd stage modules through the pipeline (CUDA if present)",
    "ort": "ONNX Runtime, CPU execution provider",
    "ort-cuda": "ONNX Runtime, CUDA execution provider (onnxruntime-gpu)",
    "ort-trt": "ONNX Runtime, TensorRT execution provider (onnxruntime-gpu + TensorRT)",
    "trt": "our TensorRT engines (dvis-trt build), tensors resident on the GPU",
}


class BackendUnavailable(Exception):
    """A requested backend cannot run on this machine (the row is reported as skipped)."""


def decode_video(path, max_frames: Optional[int] = None) -> Tuple[List[np.ndarray], float]:
    """Decode ``path`` (video file or frame folder) to RGB uint8 frames; returns (frames,
    seconds spent decoding). Raises InputError (unreadable / empty)."""
    from dvis_trt.runtime.video import open_source
    t0 = time.perf_counter()
    src = open_source(path)
    frames: List[np.ndarray] = []
    for fr in src.iter_frames():
        frames.append(fr.rgb)
        if max_frames and len(frames) >= max_frames:
            break
    if not frames:
        raise InputError(f"video {path} has no frames")
    return frames, time.perf_counter() - t0


# =============================================================================================
# runners
# =============================================================================================
@dataclass
class RunOutput:
    """One end-to-end run: final instances, wall seconds, per-stage-group seconds, and the
    engine (inside stage calls) / host split."""

    instances: Instances
    wall: float
    groups: Dict[str, float]
    engine: float
    stage_calls: Dict[str, float] = field(default_factory=dict)

    @property
    def host(self) -> float:
        return max(0.0, self.wall - self.engine)


class EagerRunner:
    """The PyTorch baseline: ``DvisDaqOffline`` (fp32, CPU), its stages timed one by one.

    ``run(frames)`` is ``model(frames)`` with a :class:`~dvis_trt.runtime.tracing.SpanTimer`
    as the model's tracing hook: the model's own spans give the stage groups (``preprocess``,
    ``segmenter``, ``tracker``, ``select``, ``refiner``, ``finalize``) and the stage-module
    calls inside them (``engine.<stage>``) the engine/host split.
    """

    name = "torch"

    def __init__(self, model, window: int = 5):
        self.model = model.eval()
        self.window = int(window)

    @property
    def settings(self):
        return self.model.settings

    def run(self, frames: Sequence[np.ndarray]) -> RunOutput:
        import torch
        from dvis_trt.runtime.tracing import NULL_TRACER, SpanTimer
        m = self.model
        old_window = m.window
        m.window = self.window
        m.tracer = timer = SpanTimer()
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                out = m(frames)
                wall = time.perf_counter() - t0
        finally:
            m.tracer = NULL_TRACER
            m.window = old_window
        g = {k: timer.total(k) for k in STAGE_GROUPS if k != "other"}
        g["other"] = max(0.0, wall - sum(g.values()))
        engine = {st: timer.total(f"engine.{st}") for st in ENGINE_STAGES
                  if f"engine.{st}" in timer.totals}
        return RunOutput(Instances.from_eager(out), wall, g, sum(engine.values()), engine)

    def set_min_size(self, short_edge: int) -> int:
        """Change the resize target (sweeps); returns the previous value."""
        old = self.model.settings.min_size_test
        self.model.settings = dataclasses.replace(self.model.settings, min_size_test=int(short_edge))
        return old

    def close(self) -> None:
        pass


#: the pipeline's spans (dvis_trt.runtime.tracing) that make up each stage group
GROUP_SPANS = {"preprocess": ("preprocess.resize", "preprocess.normalize"),
               "tracker": ("tracker",), "select": ("select", "select.topk"),
               "finalize": ("finalize",)}


class PipelineRunner:
    """``runtime.pipeline.OfflinePipeline`` on one backend, with the stage groups timed.

    Engine time per stage comes from the pipeline's own ``timings`` (time inside
    ``backend.run_resident``); the groups from the pipeline's tracing hook: a
    :class:`~dvis_trt.runtime.tracing.SpanTimer` (``sync`` around the group spans) summed as
    :data:`GROUP_SPANS`, plus the segmenter's and refiner's engine time.
    """

    def __init__(self, name: str, backend, manifest, window: int = 5, threads: int = 0,
                 sync: Optional[Callable[[], None]] = None):
        from dvis_trt.runtime.pipeline import OfflinePipeline
        from dvis_trt.runtime.postprocess import MaskUpsampler
        self.name = name
        self.backend = backend
        self.manifest = manifest
        self.window = int(window)
        self.sync = sync
        backend.load_all(manifest)
        self.pipeline = OfflinePipeline(backend, manifest.config, load_constants(manifest),
                                        window=self.window,
                                        upsampler=MaskUpsampler(intra_op_threads=threads))

    @property
    def settings(self):
        return self.pipeline.s

    def run(self, frames: Sequence[np.ndarray]) -> RunOutput:
        from dvis_trt.runtime.tracing import SpanTimer
        p = self.pipeline
        p.timings = {}
        p.tracer = timer = SpanTimer(self.sync, sync_spans=[n for names in GROUP_SPANS.values()
                                                            for n in names])
        t0 = time.perf_counter()
        res = p.run_video(frames)
        if self.sync:
            self.sync()
        wall = time.perf_counter() - t0
        t = dict(p.timings)
        g = {k: sum(timer.total(n) for n in GROUP_SPANS.get(k, ())) for k in STAGE_GROUPS
             if k != "other"}
        g["segmenter"] += t.get("segmenter", 0.0)
        g["refiner"] += t.get("refiner", 0.0)
        g["other"] = max(0.0, wall - sum(g.values()))
        return RunOutput(Instances.from_video_result(res), wall, g, sum(t.values()), t)

    def set_min_size(self, short_edge: int) -> int:
        old = self.pipeline.s.min_size_test
        self.pipeline.s = dataclasses.replace(self.pipeline.s, min_size_test=int(short_edge))
        return old

    def close(self) -> None:
        self.backend.close()


# =============================================================================================
# backends
# =============================================================================================
def _torch_cuda() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _cuda_sync():
    import torch
    return torch.cuda.synchronize


#: bench row -> (registry backend, its options) for the rows that run the runtime pipeline.
PIPELINE_ROWS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "ort": ("ort", {"providers": ("cpu",)}),
    "ort-cuda": ("ort", {"providers": ("cuda",)}),
    "ort-trt": ("ort", {"providers": ("tensorrt", "cuda")}),
    "trt": ("trt", {}),
    "torch-stages": ("torch", {}),
    "torch-fp16": ("torch", {"autocast": "fp16"}),
    "torch-compile": ("torch", {"compile": True}),
}


def make_pipeline_runner(name: str, manifest, *, model=None, threads: int,
                         window: int) -> PipelineRunner:
    """A :class:`PipelineRunner` for bench row ``name`` on a loaded bundle manifest, its
    backend made by :func:`~dvis_trt.runtime.backends.registry.create_backend`.

    Raises :class:`BackendUnavailable` (with the reason) when this machine cannot run it.
    """
    from dvis_trt.runtime.backends.registry import create_backend
    if name not in PIPELINE_ROWS:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    kind, options = PIPELINE_ROWS[name]
    sync = None
    if kind == "ort":
        if manifest.msda == "trt-builtin":
            raise BackendUnavailable("ONNX Runtime cannot run --msda trt-builtin bundles")
        options = dict(options, threads=threads)
    if kind == "torch":
        if model is None:
            raise BackendUnavailable("needs the eager model (--checkpoint or --test-weights)")
        cuda = _torch_cuda()
        if name == "torch-fp16" and not cuda:
            raise BackendUnavailable("autocast fp16 rows need CUDA (no GPU here)")
        if name == "torch-compile" and not cuda:
            raise BackendUnavailable("torch.compile rows are GPU-only in this harness (on a "
                                     "2-core CPU inductor compiles for many minutes per shape)")
        options = dict(options, model=model, device="cuda" if cuda else "cpu", threads=threads)
        sync = _cuda_sync() if cuda else None
    try:
        backend = create_backend(kind, **options)
    except DependencyError as exc:
        raise BackendUnavailable(str(exc)) from None
    except (BundleError, ImportError) as exc:
        if kind != "trt":
            raise
        raise BackendUnavailable(f"{exc}".splitlines()[0]) from None
    try:
        return PipelineRunner(name, backend, manifest, window, threads, sync=sync)
    except (DependencyError, BundleError, ImportError) as exc:
        if kind != "trt":
            raise
        raise BackendUnavailable(f"{exc}".splitlines()[0]) from None


# =============================================================================================
# A/B alternation
# =============================================================================================
#: pause between two timed calls of different backends: ONNX Runtime's intra-op threads keep
#: spinning for a moment after a call, which slowed the next eager PyTorch call by 15-25% in
#: back-to-back R50 tracker_step / refiner runs on 2 cores; 0.2 s removes it.
SETTLE_S = 0.2


def alternate(runs: Mapping[str, Callable[[], float]], rounds: int, warmup: int = 0,
              on_run: Optional[Callable[[str, int, float], None]] = None,
              settle_s: float = SETTLE_S) -> Dict[str, List[float]]:
    """Run each callable ``rounds`` times, interleaved: round r runs them in the given order
    when r is even and in reverse when odd (ABBA...), so slow drift of the machine and the
    cost of going first cancel in per-round ratios. Each callable returns its own measured
    seconds. ``warmup`` untimed rounds first. Returns name -> list of seconds per round."""
    names = list(runs)
    for w in range(max(0, warmup)):
        for n in (names if w % 2 == 0 else names[::-1]):
            runs[n]()
    out: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(max(1, rounds)):
        for n in (names if r % 2 == 0 else names[::-1]):
            if settle_s > 0 and len(names) > 1:
                time.sleep(settle_s)
            sec = float(runs[n]())
            out[n].append(sec)
            if on_run:
                on_run(n, r, sec)
    return out
