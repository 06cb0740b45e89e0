"""OpenVINO's CPU runtime next to ONNX Runtime on the same bundles: speed, outputs, start-up.

    python -m dvis_trt.benchmarks.openvino_compare FP32_BUNDLE [INT8_BUNDLE ...] VIDEO
        [--frames 12] [--rounds 3] [--threads 2] [--json openvino_compare.json]

Issue #14 asks for a second CPU runtime only if it is at least 1.2x faster end to end at the
same outputs. This script is that measurement; it does not add a backend. For each bundle
(``--msda onnx``: OpenVINO has no kernel for our ``DvisMSDeformAttn`` node and runs the
GridSample form natively; fp32 or int8 Q/DQ):

1. **Start-up**: every stage's session (ORT ``InferenceSession``, OpenVINO ``compile_model``)
   created three times in fresh backend objects: *fresh* (no cache), *cache write* (ORT's
   optimized-graph cache / OpenVINO's ``CACHE_DIR`` empty, filled by this load), *warm* (from
   that cache). Seconds per stage and in total.
2. **Same outputs**: one untimed warm-up run of the pipeline on each runtime records the inputs
   of every stage's first call (``tracker_step``: the call with the median live-track count);
   both runtimes then run those same inputs, and the largest |OpenVINO - ORT| of every output
   (absolute, and relative to max |ORT|) is reported; the final instances of the two warm-up
   runs are compared with the bench's fp32 parity rule (same instances and labels, mask IoU
   >= 0.9, |d score| <= 1e-2; :func:`dvis_trt.benchmarks.parity.compare_instances`). With an
   fp32 bundle among the inputs, the final instances of every reduced-precision bundle on
   each runtime are also held against the fp32 bundle's ORT run (the accuracy report's
   figures and verdict, :func:`dvis_trt.benchmarks.parity.accuracy_parity`): two int8
   runtimes may round differently and still both be as close to fp32.
3. **Speed**: the whole pipeline (:class:`~dvis_trt.benchmarks.runners.PipelineRunner`: host
   code, stage calls, mask upsampling) on the decoded frames, every (bundle, runtime) pair
   alternated ABBA over ``--rounds`` rounds; per round the ORT / OpenVINO ratio of the wall
   time and of each stage's time inside the backend; min / median / max over rounds; and the
   wall time spent outside the stage calls (host code: the same Python on both runtimes, but
   it shares the cores with whatever the runtime's threads do between calls).

Both runtimes use ``--threads`` compute threads (ORT ``intra_op_num_threads``, one inter-op
thread; OpenVINO ``INFERENCE_NUM_THREADS``, one stream, ``PERFORMANCE_HINT=LATENCY``,
``INFERENCE_PRECISION_HINT=f32`` so that fp32 graphs are not silently run in bf16 on CPUs that
have it). OpenVINO is optional: without it the script says so in one line and exits 2.
Prints tables and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from dvis_trt.errors import BundleError, DependencyError, DvisTrtError, InputError
from dvis_trt.runtime.backends.base import Backend, check_inputs, dtype_of

__all__ = ["OpenVinoStages", "output_differences", "round_ratios", "main"]

def _openvino():
    try:
        import openvino as ov  # noqa: PLC0415
    except ImportError as exc:
        raise DependencyError(f"this benchmark needs OpenVINO ({exc}); pip install openvino"
                              ) from None
    return ov


class OpenVinoStages(Backend):
    """A bundle's stages compiled by OpenVINO for its CPU plugin (host arrays in and out).

    The measuring instrument of this script, not a supported backend: same contract as
    :class:`~dvis_trt.runtime.backends.base.Backend` (inputs checked against the manifest,
    every output returned as a new array with the manifest's dtype).

    Args:
        threads: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's choice).
        cache_dir: OpenVINO's ``CACHE_DIR`` (compiled blobs; None: no cache).
    Raises (load_stage): BundleError for a ``--msda plugin`` / ``trt-builtin`` bundle or a
    graph OpenVINO cannot compile; DependencyError without openvino.
    """

    name = "openvino"

    def __init__(self, threads: Optional[int] = None, cache_dir: Optional[str] = None):
        self._ov = _openvino()
        self.threads = threads
        self.cache_dir = cache_dir
        self._core = self._ov.Core()
        if cache_dir:
            self._core.set_property({"CACHE_DIR": str(cache_dir)})
        #: stage -> seconds ``compile_model`` took (read + compile, or the cache load)
        self.session_seconds: Dict[str, float] = {}
        self._requests: Dict[str, Any] = {}
        self._ports: Dict[str, Dict[str, Any]] = {}
        self._specs: Dict[str, Any] = {}

    def config(self) -> Dict[str, Any]:
        """The CPU plugin properties every stage is compiled with."""
        cfg: Dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                               "INFERENCE_PRECISION_HINT": "f32"}
        if self.threads is not None:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        return cfg

    def load_stage(self, stage_name: str, manifest) -> None:
        if stage_name in self._requests:
            return
        if manifest.msda != "onnx":
            raise BundleError(f"{manifest.root} was exported with --msda {manifest.msda}; "
                              "OpenVINO runs only --msda onnx bundles (GridSample form)")
        spec = manifest.stage(stage_name)
        path = manifest.stage_path(stage_name)
        t0 = time.perf_counter()
        try:  # the path form: with CACHE_DIR, a cache hit skips reading the ONNX at all
            compiled = self._core.compile_model(str(path), "CPU", self.config())
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else \
                type(exc).__name__
            raise BundleError(f"OpenVINO cannot compile {path} (stage '{stage_name}'): {first}"
                              ) from exc
        self.session_seconds[stage_name] = time.perf_counter() - t0
        ports = {}
        for port in compiled.outputs:
            name = next((t.name for t in spec.outputs if t.name in port.get_names()), None)
            if name is not None:
                ports[name] = port
        missing = [t.name for t in spec.outputs if t.name not in ports]
        if missing:
            raise BundleError(f"{path}: OpenVINO's compiled stage has no outputs {missing}")
        self._requests[stage_name] = compiled.create_infer_request()
        self._ports[stage_name] = ports
        self._specs[stage_name] = spec

    @property
    def loaded_stages(self):
        return tuple(self._requests)

    def run(self, stage_name: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        req = self._requests.get(stage_name)
        if req is None:
            raise BundleError(f"stage '{stage_name}' is not loaded in OpenVINO; call load_stage")
        spec = self._specs[stage_name]
        check_inputs(spec, inputs)
        res = req.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return {t.name: np.array(res[self._ports[stage_name][t.name]], copy=True)
                .astype(dtype_of(t.dtype), copy=False) for t in spec.outputs}

    def close(self) -> None:
        self._requests.clear()
        self._ports.clear()
        self._specs.clear()


# =============================================================================================
# pure parts
# =============================================================================================
def output_differences(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]
                       ) -> Dict[str, Dict[str, float]]:
    """Per output of ``ref``: ``max_abs`` = max |got - ref| and ``max_rel`` = that / max |ref|
    (0 when ``ref`` is all zeros and so is the difference; inf when only ``ref`` is zero).
    Computed in float64. Raises InputError when an output is missing or its shape differs."""
    out = {}
    for name, r in ref.items():
        if name not in got:
            raise InputError(f"output '{name}' is missing")
        r64 = np.asarray(r, np.float64)
        g64 = np.asarray(got[name], np.float64)
        if r64.shape != g64.shape:
            raise InputError(f"output '{name}': shape {g64.shape} != reference {r64.shape}")
        d = float(np.abs(g64 - r64).max()) if r64.size else 0.0
        scale = float(np.abs(r64).max()) if r64.size else 0.0
        out[name] = {"max_abs": d, "max_rel": d / scale if scale > 0 else
                     (0.0 if d == 0 else float("inf"))}
    return out


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> Dict[str, Any]:
    """Per-round ratios numerator[r] / denominator[r] (e.g. ORT seconds / OpenVINO seconds:
    > 1 means OpenVINO is faster) with min / median / max. Raises InputError for lists of
    different lengths, no rounds or a non-positive denominator."""
    if len(numerator) != len(denominator) or not numerator:
        raise InputError(f"round_ratios: {len(numerator)} vs {len(denominator)} rounds")
    if min(denominator) <= 0:
        raise InputError("round_ratios: a denominator is <= 0")
    r = [float(a) / float(b) for a, b in zip(numerator, denominator)]
    return {"n": len(r), "min": min(r), "median": float(np.median(r)), "max": max(r),
            "values": r}


# =============================================================================================
# the measurements
# =============================================================================================
def _ort_backend(threads: int, graph_cache: Optional[str], spin: bool = True):
    """The project's ORT backend (CPU, ``threads``). ``spin=False``: its sessions also set
    ``session.intra_op.allow_spinning = 0`` (worker threads sleep instead of spinning after
    each call), an experiment of this script (``--ort-no-spin``), not a backend option."""
    from dvis_trt.runtime.backends.ort_backend import OrtBackend  # noqa: PLC0415
    if spin:
        return OrtBackend(("cpu",), threads=threads, graph_cache=graph_cache)

    class _NoSpin(OrtBackend):
        def _session_options(self, msda, per_frame_shapes=False):
            so = super()._session_options(msda, per_frame_shapes)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return so

    return _NoSpin(("cpu",), threads=threads, graph_cache=graph_cache)


def session_times(manifest, threads: int, work: Path) -> Dict[str, Dict[str, Any]]:
    """Stage load seconds for each runtime and cache state (module docstring, step 1):
    ``{"ort": {"fresh": {stage: s, ..., "total": s}, "cache_write": ..., "warm": ...},
    "openvino": {...}}``. Caches go to fresh folders under ``work``."""
    out: Dict[str, Dict[str, Any]] = {}
    ort_cache = tempfile.mkdtemp(prefix="ort_graphs_", dir=work)
    ov_cache = tempfile.mkdtemp(prefix="ov_cache_", dir=work)
    makers: Dict[str, Dict[str, Callable[[], Backend]]] = {
        "ort": {"fresh": lambda: _ort_backend(threads, None),
                "cache_write": lambda: _ort_backend(threads, ort_cache),
                "warm": lambda: _ort_backend(threads, ort_cache)},
        "openvino": {"fresh": lambda: OpenVinoStages(threads, None),
                     "cache_write": lambda: OpenVinoStages(threads, ov_cache),
                     "warm": lambda: OpenVinoStages(threads, ov_cache)},
    }
    for runtime, states in makers.items():
        out[runtime] = {}
        for state, make in states.items():
            backend = make()
            try:
                backend.load_all(manifest)
                secs = {k: float(v[0] if isinstance(v, tuple) else v)
                        for k, v in backend.session_seconds.items()}
            finally:
                backend.close()
            secs["total"] = sum(secs.values())
            out[runtime][state] = secs
    shutil.rmtree(ort_cache, ignore_errors=True)
    shutil.rmtree(ov_cache, ignore_errors=True)
    return out


def _fmt_ratio(r: Mapping[str, Any]) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def compare_bundle_outputs(ort_b, ov_b, samples: Mapping[str, Mapping[str, np.ndarray]]
                           ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """stage -> output -> {max_abs, max_rel} of OpenVINO against ORT on the same inputs."""
    return {stage: output_differences(ov_b.run(stage, feed), ort_b.run(stage, feed))
            for stage, feed in samples.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", metavar="BUNDLE... VIDEO",
                    help="one or more --msda onnx bundles (fp32, int8), then the video")
    ap.add_argument("--frames", type=int, default=12, help="first N frames of the video")
    ap.add_argument("--rounds", type=int, default=3, help="timed alternating rounds (>= 1)")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of both runtimes")
    ap.add_argument("--window", type=int, default=5, help="frames per segmenter call")
    ap.add_argument("--no-startup", action="store_true", help="skip the session-creation timing")
    ap.add_argument("--ort-no-spin", action="store_true",
                    help="also time ORT with session.intra_op.allow_spinning=0 (a third row)")
    ap.add_argument("--max-rss-gb", type=float, default=12.0,
                    help="stop (exit 3) if this process's resident memory passes this (GiB)")
    ap.add_argument("--work-dir", default=None, help="where the caches go (default: temp)")
    ap.add_argument("--json", default="openvino_compare.json")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (DvisTrtError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class RssGuard:
    """Stops the process (exit 3, one line on stderr) when its resident memory passes
    ``limit_gib``: a benchmark must not take a shared machine down. Also keeps the peak
    (``peak_gib``). Samples ``/proc/self/status`` every ``interval`` s in a daemon thread;
    a no-op where that file does not exist."""

    def __init__(self, limit_gib: float, interval: float = 0.5):
        import threading  # noqa: PLC0415
        self.limit = float(limit_gib)
        self.peak_gib = 0.0
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        if os.path.exists("/proc/self/status"):
            self._thread.start()

    @staticmethod
    def rss_gib() -> float:
        with open("/proc/self/status", encoding="ascii") as f:
            kb = next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)
        return kb / 2 ** 20

    def _loop(self, interval: float) -> None:
        while True:
            g = self.rss_gib()
            self.peak_gib = max(self.peak_gib, g)
            if g > self.limit:
                print(f"stopping: resident memory {g:.1f} GiB passed --max-rss-gb {self.limit}",
                      file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(interval)


def _run(args) -> int:
    from dvis_trt.runtime.bundle import load_manifest  # noqa: PLC0415

    from .parity import accuracy_parity, compare_instances  # noqa: PLC0415
    from .runners import PipelineRunner, alternate, decode_video  # noqa: PLC0415
    from .stages import capture_stage_inputs  # noqa: PLC0415
    from .system import pin_threads  # noqa: PLC0415

    if len(args.inputs) < 2:
        raise InputError("give one or more bundles and then a video")
    if args.rounds < 1 or args.frames < 1 or args.threads < 1:
        raise InputError("--rounds, --frames and --threads must be >= 1")
    ov = _openvino()
    ort_version = __import__("onnxruntime").__version__
    *bundles, video = args.inputs
    manifests = [load_manifest(b) for b in bundles]
    for m in manifests:
        if m.msda != "onnx":
            raise InputError(f"{m.root}: --msda {m.msda}; OpenVINO needs --msda onnx bundles")
    # the fp32 bundle first: the others' instances are held against its ORT run
    manifests.sort(key=lambda m: m.precision != "fp32")
    keys = [f"{m.precision}" for m in manifests]
    if len(set(keys)) != len(keys):
        keys = [f"{m.precision}:{Path(m.root).name}" for m in manifests]
    runtimes = ["ort", "openvino"] + (["ort-nospin"] if args.ort_no_spin else [])
    guard = RssGuard(args.max_rss_gb)
    pin_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dvis_ov_"))
    work.mkdir(parents=True, exist_ok=True)
    frames, _ = decode_video(video, args.frames)
    h, w = frames[0].shape[:2]
    print(f"{len(frames)} frames {h}x{w} of {video}; {args.threads} threads; onnxruntime "
          f"{ort_version}, openvino {ov.__version__}", flush=True)
    report: Dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "video": str(video), "frames": len(frames), "size": [h, w], "threads": args.threads,
        "rounds": args.rounds, "runtimes": runtimes,
        "versions": {"onnxruntime": ort_version, "openvino": ov.__version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "bundles": {}}
    makers = {"ort": lambda: _ort_backend(args.threads, None),
              "ort-nospin": lambda: _ort_backend(args.threads, None, spin=False),
              "openvino": lambda: OpenVinoStages(args.threads)}
    fp32_ref = None  # the fp32 bundle's final instances on ORT
    for key, m in zip(keys, manifests):
        # one bundle at a time (its runtimes alternate with each other): an R50 pipeline on
        # each runtime holds a few GiB
        entry: Dict[str, Any] = {"bundle": str(m.root), "precision": m.precision}
        report["bundles"][key] = entry
        if not args.no_startup:
            t0 = time.perf_counter()
            entry["startup_s"] = st = session_times(m, args.threads, work)
            print(f"[{key}] start-up, all stages (s): " + "; ".join(
                f"{rt} " + ", ".join(f"{s} {v['total']:.2f}" for s, v in st[rt].items())
                for rt in st) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        runners = {rt: PipelineRunner(f"{key}/{rt}", makers[rt](), m, args.window, args.threads)
                   for rt in runtimes}
        try:
            # warm-up (untimed): records the ORT run's stage inputs; final instances compared
            rec, out_ort = capture_stage_inputs(runners["ort"], frames)
            out_ov = runners["openvino"].run(frames)
            for rt in runtimes[2:]:
                runners[rt].run(frames)
            entry["stage_differences"] = compare_bundle_outputs(
                runners["ort"].backend, runners["openvino"].backend, rec.samples)
            del rec
            entry["instances"] = inst = compare_instances(out_ort.instances, out_ov.instances)
            worst = max((d["max_rel"], f"{s}.{o}")
                        for s, outs in entry["stage_differences"].items() for o, d in outs.items())
            print(f"[{key}] OpenVINO vs ORT outputs: largest relative difference {worst[0]:.2e} "
                  f"({worst[1]}); final instances "
                  f"{'same' if inst['ok'] else 'DIFFER: ' + str(inst['reason'])} "
                  f"({inst['instances']} vs {inst['ref_instances']}, min IoU {inst['min_iou']}, "
                  f"max |d score| {inst['max_score_diff']}); RSS {guard.rss_gib():.1f} GiB",
                  flush=True)
            # a reduced-precision bundle approximates fp32 on either runtime: also hold its
            # instances against the fp32 bundle's ORT run (the accuracy report's figures)
            if m.precision == "fp32" and fp32_ref is None:
                fp32_ref = (key, out_ort.instances)
            elif m.precision != "fp32" and fp32_ref is not None:
                acc = {rt: accuracy_parity(fp32_ref[1], o.instances)["accuracy"]
                       for rt, o in (("ort", out_ort), ("openvino", out_ov))}
                entry["accuracy_vs_fp32_ort"] = acc
                for rt, a in acc.items():
                    print(f"[{key}/{rt}] vs {fp32_ref[0]}/ort: {a['verdict']}", flush=True)
            del out_ort, out_ov
            results: Dict[str, List[Any]] = {rt: [] for rt in runtimes}

            def timed(rt):
                def go():
                    out = runners[rt].run(frames)
                    out.instances = None  # only the times are kept
                    results[rt].append(out)
                    return out.wall
                return go

            def say(rt, r, sec, key=key):
                print(f"  round {r + 1}: {key + '/' + rt:>20s} {sec:7.2f} s  (RSS "
                      f"{guard.rss_gib():.1f} GiB)", flush=True)

            walls = alternate({rt: timed(rt) for rt in runtimes}, args.rounds, on_run=say)
        finally:
            for r in runners.values():
                r.close()
            del runners
        stages = sorted(results["ort"][0].stage_calls)
        sec = entry["seconds"] = {
            rt: {"wall": walls[rt], "outside_stages": [r.host for r in results[rt]],
                 "stages": {s: [r.stage_calls.get(s, 0.0) for r in results[rt]] for s in stages}}
            for rt in runtimes}
        entry["ratios_over_openvino"] = rat = {
            rt: {"end_to_end": round_ratios(sec[rt]["wall"], sec["openvino"]["wall"]),
                 **{s: round_ratios(sec[rt]["stages"][s], sec["openvino"]["stages"][s])
                    for s in stages}}
            for rt in runtimes if rt != "openvino"}
        entry["verdict"] = {
            "rule": ">= 1.2x end to end (median ORT / OpenVINO) at the same outputs",
            "end_to_end_median": rat["ort"]["end_to_end"]["median"],
            "same_outputs": bool(entry["instances"]["ok"]),
            "passes": bool(rat["ort"]["end_to_end"]["median"] >= 1.2
                           and entry["instances"]["ok"])}
        _print_times(key, args.rounds, runtimes, stages, sec, rat)
    report["peak_rss_gib"] = guard.peak_gib
    from dvis_trt.fileio import atomic_write_json, strict_json  # noqa: PLC0415
    atomic_write_json(Path(args.json), strict_json(report), indent=2)
    print(f"peak RSS {guard.peak_gib:.1f} GiB; written {args.json}")
    return 0


def _print_times(key, rounds, runtimes, stages, sec, rat) -> None:
    print(f"[{key}] seconds (median of {rounds} rounds) and per-round ratios "
          "X / OpenVINO, median (min-max); > 1: OpenVINO faster")
    print("  " + f"{'':15s}" + "".join(f"{c:>12s}" for c in runtimes)
          + "".join(f"  {c + ' / openvino':>26s}" for c in rat))
    for name in ["end to end", *stages, "outside stages"]:
        def med(rt):
            v = sec[rt]["wall"] if name == "end to end" else sec[rt]["outside_stages"] \
                if name == "outside stages" else sec[rt]["stages"][name]
            return float(np.median(v))
        r_key = "end_to_end" if name == "end to end" else name
        print("  " + f"{name:15s}" + "".join(f"{med(c):12.3f}" for c in runtimes)
              + "".join(f"  {_fmt_ratio(rat[rt][r_key]) if r_key in rat[rt] else '':>26s}"
                        for rt in rat), flush=True)




if __name__ == "__main__":
    sys.exit(main())
