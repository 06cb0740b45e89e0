"""Timing harness: backends side by side against the eager PyTorch baseline, parity in the same run.

Pieces (all usable on their own):

* statistics (:func:`summarize`, :func:`ratio_summary`), thread pinning (:func:`pin_threads`),
  machine / version record (:func:`system_info`), memory sampling (:class:`MemorySampler`),
  the sustained-GEMM probe (:func:`gemm_rate`);
* runners: :class:`EagerRunner` (the baseline: ``DvisDaqOffline``'s stages ``run_segmenter``,
  ``run_tracker``, ``select_instances``, ``refiner.forward_stage``, ``finalize``, each timed) and
  :class:`PipelineRunner` (``runtime.pipeline.OfflinePipeline`` on any backend: ONNX Runtime,
  TensorRT, eager stages); both return a :class:`RunOutput` with the final instances, the
  per-stage-group times and the engine/host split;
* parity: :func:`compare_instances` (same instance set by Hungarian matching on video mask IoU
  with equal labels, IoU and score bounds); a mismatch makes a row invalid;
* :func:`alternate` (A/B/... rounds with the order reversed every round, so drift and order
  effects cancel in the per-round ratios) and :func:`bench_stages` (every stage on the same
  captured real inputs, backends alternated per iteration);
* :func:`run_bench`: the whole benchmark as one JSON-able record (see ``docs/benchmarks.md``
  for the schema); :mod:`dvis_trt.benchmarks.report` writes JSON / markdown / PNG.

Stage groups of an end-to-end run (the same names for every backend, so rows line up):
``preprocess`` (resize + normalise + pad), ``segmenter``, ``tracker`` (tracker stages *and* the
per-frame host work: scores, Hungarian slot match, track hub), ``select`` (noise filter,
top-K, frame-linked fill), ``refiner``, ``finalize`` (mask head, resize to the frame, for the
pipeline also RLE encoding), ``other`` (the rest of the wall time). ``engine_s`` is the time
inside stage calls (graph / module execution), ``host_s`` = wall - engine.
"""
from __future__ import annotations

from typing import Any, Dict



from dvis_trt.runtime.bundle import load_constants

from . import bench_steps as steps
from .bench_options import BenchOptions, build_eager_model  # noqa: F401 - the face
from .parity import Instances, compare_instances
from .runners import (BACKENDS, ENGINE_STAGES, SCHEMA, STAGE_GROUPS, BackendUnavailable,
                      EagerRunner, PipelineRunner, RunOutput, alternate, decode_video)
from .stages import (RecordingBackend, bench_stages, capture_stage_inputs, profile_ort_stage,
                     profile_torch_stage)
from .system import (MemorySampler, available_cpus, gemm_rate, pin_threads, ratio_summary,
                     summarize, system_info)

__all__ = [
    "SCHEMA", "STAGE_GROUPS", "ENGINE_STAGES", "BACKENDS", "BackendUnavailable",
    "summarize", "ratio_summary", "pin_threads", "available_cpus", "system_info",
    "MemorySampler", "gemm_rate", "Instances", "RunOutput", "EagerRunner", "PipelineRunner",
    "compare_instances", "alternate", "RecordingBackend", "capture_stage_inputs",
    "bench_stages", "BenchOptions", "run_bench", "decode_video", "load_constants",
    "profile_ort_stage", "profile_torch_stage",
]


# =============================================================================================
# the whole benchmark
# =============================================================================================


def run_bench(opts: BenchOptions) -> Dict[str, Any]:
    """Run the benchmark; returns one result record (JSON-able; schema in docs/benchmarks.md).

    Order: pin threads; decode the video once (frames shared by every backend); build the
    runners (unavailable backends become ``skipped`` rows); one untimed run per runner (warm-up,
    also the parity output and, for the first engine backend, the captured stage inputs and
    the stage calls for the FLOP count); ``repeats`` alternated timed rounds, each = decode +
    run; parity of every row against the eager baseline; the per-stage micro-benchmark; the
    GEMM probe; FLOPs; the optional sweep.
    """
    state = steps.BenchRun(opts)
    steps.check_options(state)
    steps.pin_and_load(state)
    steps.decode_video_once(state)
    steps.eager_baseline(state)
    steps.build_runners(state)
    steps.warm_up_and_capture(state)
    steps.parity(state)
    steps.timed_rounds(state)
    steps.summarize_rows(state)
    steps.isolated_memory(state)
    steps.stage_microbench(state)
    steps.op_profile(state)
    steps.gemm_and_flops(state)
    steps.record(state)
    steps.sweep(state)
    steps.close_runners(state)
    return state.record
