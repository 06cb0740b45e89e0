"""Per-stage timing: every stage on the same captured real inputs, backends alternated per
iteration; and where a stage's time goes, by op type (ONNX Runtime and torch profilers)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np


from .runners import ENGINE_STAGES, SETTLE_S, PipelineRunner
from .system import ratio_summary, summarize


# =============================================================================================
# per-stage micro-benchmark
# =============================================================================================
class RecordingBackend:
    """Wraps a backend; records every stage call's input shapes (for FLOP counts) and keeps
    host copies of one representative input set per stage: the first call of each stage, and
    for ``tracker_step`` the call whose ``tQ`` is the median over the run. Everything else is
    delegated to the wrapped backend."""

    def __init__(self, backend):
        self._inner = backend
        self.calls: List[Tuple[str, Dict[str, Tuple[int, ...]]]] = []
        self.samples: Dict[str, Dict[str, np.ndarray]] = {}
        self._steps: List[Dict[str, np.ndarray]] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _record(self, stage: str, inputs: Mapping[str, Any]) -> None:
        self.calls.append((stage, {k: tuple(int(d) for d in v.shape) for k, v in inputs.items()}))
        if stage == "tracker_step":
            self._steps.append({k: np.array(self._inner.to_host(v)) for k, v in inputs.items()})
        elif stage not in self.samples:
            self.samples[stage] = {k: np.array(self._inner.to_host(v)) for k, v in inputs.items()}

    def run_resident(self, stage, inputs, fetch=()):
        self._record(stage, inputs)
        return self._inner.run_resident(stage, inputs, fetch=fetch)

    def run(self, stage, inputs):
        self._record(stage, inputs)
        return self._inner.run(stage, inputs)

    def finish(self) -> None:
        if self._steps:
            tq = sorted(s["track_queries"].shape[0] for s in self._steps)
            med = tq[len(tq) // 2]
            self.samples["tracker_step"] = next(s for s in self._steps
                                                if s["track_queries"].shape[0] == med)
            self._steps = []


def capture_stage_inputs(runner: PipelineRunner, frames: Sequence[np.ndarray]):
    """Run the pipeline once with a :class:`RecordingBackend`; returns (recorder, RunOutput)."""
    rec = RecordingBackend(runner.backend)
    p = runner.pipeline
    p.backend = rec
    try:
        out = runner.run(frames)
    finally:
        p.backend = runner.backend
    rec.finish()
    return rec, out


#: frames per call of each stage, from its inputs (throughput in frames/s)
def _frames_per_call(stage: str, inputs: Mapping[str, np.ndarray]) -> int:
    if stage == "segmenter":
        return int(inputs["images"].shape[0])
    if stage == "refiner":
        return int(inputs["instance_embeds"].shape[0])
    if stage == "mask_head":
        return int(inputs["mask_embed"].shape[0])
    return 1


def bench_stages(backends: Mapping[str, Any], samples: Mapping[str, Mapping[str, np.ndarray]],
                 iters: int = 10, warmup: int = 1, budget_s: float = 30.0, min_iters: int = 3,
                 sync: Optional[Mapping[str, Callable[[], None]]] = None,
                 stages: Sequence[str] = ENGINE_STAGES,
                 settle_s: float = SETTLE_S) -> Dict[str, Dict[str, Any]]:
    """Time every stage on the same captured inputs with each backend (``backend.run`` on host
    arrays), backends alternated per iteration.

    Iterations per stage: ``iters``, reduced (to at least ``min(min_iters, iters)``) so that one stage
    takes about ``budget_s`` seconds with the slowest backend (the warm-up run sets the pace).
    A pause of ``settle_s`` precedes every timed call (see :data:`SETTLE_S`).
    Returns stage -> backend -> :func:`summarize` stats + ``frames_per_call`` and
    ``throughput_fps``; also stage -> ``"_ratios"`` -> "b/a" per-iteration ratio summaries
    against the first backend.
    """
    names = list(backends)
    out: Dict[str, Dict[str, Any]] = {}
    sync = sync or {}
    for stage in stages:
        inputs = samples.get(stage)
        if inputs is None:
            continue
        slowest = 0.0
        for n in names:
            for _ in range(max(1, warmup)):
                sync.get(n, lambda: None)()
                t0 = time.perf_counter()
                backends[n].run(stage, inputs)
                sync.get(n, lambda: None)()
                slowest = max(slowest, time.perf_counter() - t0)
        floor = max(1, min(int(min_iters), int(iters)))
        n_iter = max(floor, min(int(iters), int(budget_s / max(slowest * len(names), 1e-9))))
        times: Dict[str, List[float]] = {n: [] for n in names}
        for it in range(n_iter):
            for n in (names if it % 2 == 0 else names[::-1]):
                if settle_s > 0 and len(names) > 1:
                    time.sleep(settle_s)  # see SETTLE_S
                s = sync.get(n, lambda: None)
                s()
                t0 = time.perf_counter()
                backends[n].run(stage, inputs)
                s()
                times[n].append(time.perf_counter() - t0)
        fpc = _frames_per_call(stage, inputs)
        res: Dict[str, Any] = {}
        for n in names:
            st = summarize(times[n])
            st["frames_per_call"] = fpc
            st["throughput_fps"] = fpc / st["p50"] if st["p50"] > 0 else None
            res[n] = st
        if len(names) > 1:
            base = names[0]
            # speedup of each backend over the first, per iteration (same inputs, alternated)
            res["_ratios"] = {f"{n} vs {base}": ratio_summary(
                [tb / tn for tn, tb in zip(times[n], times[base])]) for n in names[1:]}
        res["_shapes"] = {k: list(v.shape) for k, v in inputs.items()}
        out[stage] = res
    return out


# =============================================================================================
# where a stage's time goes, by op type
# =============================================================================================
def _top(agg: Mapping[str, float], counts: Mapping[str, int], top: int) -> Dict[str, Any]:
    total = sum(agg.values())
    ops = sorted(agg.items(), key=lambda kv: -kv[1])
    return {"total_s": total,
            "ops": [{"op": k, "s": v, "share": (v / total if total else 0.0),
                     "calls": int(counts.get(k, 0))} for k, v in ops[:top]]}


def profile_ort_stage(manifest, stage: str, inputs: Mapping[str, np.ndarray], threads: int,
                      top: int = 12) -> Dict[str, Any]:
    """Kernel time per ONNX op type of one ``stage`` call in ONNX Runtime (CPU), from ORT's own
    profiler: a fresh session (same threads, all optimisations, the MSDA CPU twin for plugin
    bundles, the int8 session options of :class:`OrtBackend`), one warm-up call, one profiled
    call. Returns ``{"total_s", "ops": [{"op", "s", "share", "calls"}]}`` (op types after
    ORT's fusions, e.g. ``FusedMatMul``)."""
    import tempfile
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if manifest.msda == "plugin":
        from dvis_trt.plugins.ort_op import session_options
        so = session_options(so)
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        # int8 bundles run with ORT's common-subexpression elimination off (as OrtBackend
        # runs them): it would merge the per-consumer Q/DQ pairs and un-fuse int8 kernels
        from dvis_trt.runtime.backends.ort_backend import INT8_DISABLED_OPTIMIZERS
        sess = ort.InferenceSession(
            str(manifest.stage_path(stage)), so, providers=["CPUExecutionProvider"],
            disabled_optimizers=(INT8_DISABLED_OPTIMIZERS if manifest.precision == "int8"
                                 else None))
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        sess.run(None, feed)
        sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    t0 = runs[-1]["ts"] if runs else 0
    agg: Dict[str, float] = {}
    cnt: Dict[str, int] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") \
                and e.get("ts", 0) >= t0:
            op = e.get("args", {}).get("op_name", "?")
            agg[op] = agg.get(op, 0.0) + e.get("dur", 0) / 1e6
            cnt[op] = cnt.get(op, 0) + 1
    return _top(agg, cnt, top)


def profile_torch_stage(model, stage: str, inputs: Mapping[str, np.ndarray],
                        top: int = 12) -> Dict[str, Any]:
    """Self CPU time per aten op of one eager ``stage`` call (``torch.profiler``; one warm-up
    call first). Same return layout as :func:`profile_ort_stage`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from dvis_trt.export.model.msda import msda_mode
    from dvis_trt.export.stages import build_stages, stage_input_names
    mod = build_stages(model)[stage]
    args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in stage_input_names(stage)]
    with torch.no_grad(), msda_mode("eager"):
        mod(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            mod(*args)
    agg = {k.key: k.self_cpu_time_total / 1e6 for k in prof.key_averages()}
    cnt = {k.key: k.count for k in prof.key_averages()}
    return _top(agg, cnt, top)
