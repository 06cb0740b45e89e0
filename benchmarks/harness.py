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

import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dvis_trt.runtime.errors import BundleError, DependencyError, InputError

__all__ = [
    "SCHEMA", "STAGE_GROUPS", "ENGINE_STAGES", "BACKENDS", "BackendUnavailable",
    "summarize", "ratio_summary", "pin_threads", "available_cpus", "system_info",
    "MemorySampler", "gemm_rate", "Instances", "RunOutput", "EagerRunner", "PipelineRunner",
    "compare_instances", "alternate", "RecordingBackend", "capture_stage_inputs",
    "bench_stages", "BenchOptions", "run_bench", "decode_video", "load_constants",
    "profile_ort_stage", "profile_torch_stage",
]

SCHEMA = "dvis-trt-bench/1"
STAGE_GROUPS = ("preprocess", "segmenter", "tracker", "select", "refiner", "finalize", "other")
ENGINE_STAGES = ("segmenter", "tracker_first", "tracker_step", "refiner", "mask_head")
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
#: per-row parity bounds (fp32 rows / reduced-precision rows), see compare_instances.
#: fp32: the R50 segmenter's outputs agree to ~3e-6 relative between ORT and eager torch, but
#: the spread test weights amplify the tracker's pooled-mask position embeds 30x (pos_scale),
#: so final scores of the same instances differ by up to ~1.1e-3 on the R50 360p clip (IoU >=
#: 0.993, same track ids); 1e-2 keeps a 9x margin over that and still fails any run whose
#: instances or classes differ (those move scores by >= 0.05, or fail the matching outright).
FP32_PARITY = {"iou_min": 0.9, "score_atol": 1e-2}
LOWP_PARITY = {"iou_min": 0.8, "score_atol": 5e-2}
LOWP_BACKENDS = ("torch-fp16",)


class BackendUnavailable(Exception):
    """A requested backend cannot run on this machine (the row is reported as skipped)."""


# =============================================================================================
# statistics
# =============================================================================================
def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """Order statistics of timing samples (seconds): n, mean, std, min, p50, p90, p99, max.

    Percentiles use linear interpolation between order statistics (numpy's default), so with
    few samples p90/p99 lie between the two largest. Raises ValueError for no samples.
    """
    x = np.asarray(list(samples), dtype=np.float64)
    if x.size == 0:
        raise ValueError("summarize: no samples")
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std()),
            "min": float(x.min()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(x.max())}


def ratio_summary(ratios: Sequence[float]) -> Dict[str, Any]:
    """min / median / max (and the values) of per-round ratios."""
    r = [float(v) for v in ratios]
    if not r:
        raise ValueError("ratio_summary: no ratios")
    return {"n": len(r), "min": min(r), "median": float(np.median(r)), "max": max(r),
            "values": r}


# =============================================================================================
# threads, machine
# =============================================================================================
def available_cpus() -> int:
    """CPUs this process may run on (affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def pin_threads(threads: int, affinity: bool = False) -> Dict[str, Any]:
    """Use ``threads`` compute threads everywhere; returns what was set (for the record).

    torch: ``set_num_threads(threads)`` and one inter-op thread (if torch is imported; the
    inter-op count can only be set before torch's first parallel region, so it is reported as
    it really is); ONNX Runtime sessions made by the harness get ``intra_op_num_threads =
    threads``, ``inter_op_num_threads = 1``; ``OMP/MKL/OPENBLAS_NUM_THREADS`` are exported for
    child processes. ``affinity=True`` also pins the process to the first ``threads`` CPUs of
    its affinity mask. Raises InputError for threads < 1.
    """
    if int(threads) < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    threads = int(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    cpus = None
    if affinity and hasattr(os, "sched_setaffinity"):
        mask = sorted(os.sched_getaffinity(0))
        cpus = mask[:threads]
        os.sched_setaffinity(0, cpus)
    out: Dict[str, Any] = {"threads": threads, "ort_intra_op": threads, "ort_inter_op": 1}
    if "torch" in sys.modules:
        import torch
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # parallel work already started: keep what it is
            pass
        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    try:
        out["affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        out["affinity"] = None
    out["pinned_cpus"] = cpus
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> List[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4_2")))
    except OSError:  # pragma: no cover
        pass
    return []


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _gpu_info() -> Optional[Dict[str, Any]]:
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    except Exception:  # noqa: BLE001
        pass
    return None


def system_info() -> Dict[str, Any]:
    """Machine and software record stored with every result."""
    try:
        import psutil
        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        mem_gb = None
    try:
        import onnxruntime as ort
        providers = ort.get_available_providers()
    except ImportError:  # pragma: no cover
        providers = []
    info = {
        "hostname": platform.node(), "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpus_available": available_cpus(),
        "cpu_flags": _cpu_flags(), "memory_gb": mem_gb,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("dvis-trt", "numpy", "torch", "onnx", "onnxruntime",
                                              "onnxruntime-gpu", "tensorrt", "av", "scipy")},
        "ort_providers": providers, "gpu": _gpu_info(), "git": _git_commit(),
    }
    if "torch" in sys.modules:
        import torch
        info["torch_parallel"] = torch.__config__.parallel_info().splitlines()[0:4]
    return info


# =============================================================================================
# memory
# =============================================================================================
class MemorySampler:
    """Peak resident memory (and, where visible, GPU memory) while the ``with`` body runs.

    A thread samples the process RSS every ``interval`` seconds (psutil); ``peak_rss`` /
    ``start_rss`` are bytes. GPU: device-wide used memory via ``torch.cuda.mem_get_info`` when
    CUDA is initialised, and ``torch.cuda.max_memory_allocated`` (``torch_peak``) for torch
    work. In-process numbers include everything the process holds (every loaded model); the
    harness's ``--memory isolated`` mode measures each backend in its own process instead.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = float(interval)
        self.start_rss = 0
        self.peak_rss = 0
        self.gpu_start: Optional[int] = None
        self.gpu_peak: Optional[int] = None
        self.torch_peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _cuda():
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                return torch
        except Exception:  # noqa: BLE001
            pass
        return None

    def _gpu_used(self) -> Optional[int]:
        torch = self._cuda()
        if torch is None:
            return None
        try:
            free, total = torch.cuda.mem_get_info()
            return int(total - free)
        except Exception:  # noqa: BLE001
            return None

    def _loop(self, proc) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            except Exception:  # noqa: BLE001
                pass
            g = self._gpu_used()
            if g is not None:
                self.gpu_peak = max(self.gpu_peak or 0, g)

    def __enter__(self) -> "MemorySampler":
        import psutil
        proc = psutil.Process()
        self.start_rss = self.peak_rss = proc.memory_info().rss
        self.gpu_start = self.gpu_peak = self._gpu_used()
        torch = self._cuda()
        if torch is not None:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._loop, args=(proc,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        import psutil
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)
        torch = self._cuda()
        if torch is not None:
            self.torch_peak = int(torch.cuda.max_memory_allocated())

    def to_dict(self) -> Dict[str, Optional[float]]:
        mb = 1 / 2**20
        return {"peak_rss_mb": self.peak_rss * mb,
                "rss_growth_mb": (self.peak_rss - self.start_rss) * mb,
                "peak_gpu_mb": None if self.gpu_peak is None else self.gpu_peak * mb,
                "torch_cuda_peak_mb": None if self.torch_peak is None else self.torch_peak * mb}


# =============================================================================================
# sustained GEMM rate
# =============================================================================================
def _gemm_graph(n: int) -> bytes:
    from onnx import TensorProto, helper
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm", [a, b], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def _rate_loop(fn: Callable[[], Any], flops: float, seconds: float) -> Dict[str, Any]:
    fn()  # warm-up (allocations, thread pools, kernel selection)
    rates: List[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t0 = time.perf_counter()
        fn()
        rates.append(flops / (time.perf_counter() - t0))
    return {"gflops_median": float(np.median(rates)) / 1e9, "gflops_max": max(rates) / 1e9,
            "gflops_min": min(rates) / 1e9, "runs": len(rates)}


def gemm_rate(threads: int, sizes: Sequence[int] = (1024, 2048), seconds: float = 2.0,
              engines: Sequence[str] = ("torch", "ort", "numpy")) -> Dict[str, Any]:
    """This machine's fp32 GEMM rate, measured now at ``threads`` threads.

    Square ``n`` x ``n`` fp32 matrix products for each ``n`` in ``sizes``, repeated for
    ``seconds`` per (engine, size) after one warm-up: ``torch`` (``torch.mm`` at
    ``torch.set_num_threads(threads)``), ``ort`` (a one-node ONNX MatMul in ONNX Runtime with
    ``intra_op_num_threads = threads``: MLAS, what the ORT backend's MatMul/Conv use) and
    ``numpy`` (its BLAS; only measured when ``threads`` equals the available CPUs, since
    numpy's BLAS thread count cannot be set at run time). Per (engine, size): median (the
    sustained rate over the window), max and min GFLOP/s (one multiply-add = 2 FLOPs).

    ``best``: the highest single-product rate over engines and sizes (``gflops``) and the
    highest median (``sustained_gflops``). The compute-bound minimum of a stage is
    ``GEMM FLOPs / best.gflops``: other processes on a shared machine can only slow a product
    down, so the best product is the closest estimate of what the cores sustain undisturbed.
    Raises DependencyError when no engine can run.
    """
    sizes = [int(n) for n in (sizes if isinstance(sizes, (list, tuple)) else [sizes])]
    out: Dict[str, Any] = {"sizes": sizes, "threads": int(threads), "seconds": float(seconds),
                           "dtype": "float32"}
    rng = np.random.default_rng(0)
    for eng in engines:
        res: Dict[str, Any] = {}
        for n in sizes:
            flops = 2.0 * n ** 3
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            try:
                if eng == "torch":
                    import torch
                    torch.set_num_threads(int(threads))
                    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                    res[str(n)] = _rate_loop(lambda: torch.mm(ta, tb), flops, seconds)
                elif eng == "ort":
                    import onnxruntime as ort
                    so = ort.SessionOptions()
                    so.intra_op_num_threads = int(threads)
                    so.inter_op_num_threads = 1
                    so.log_severity_level = 3
                    sess = ort.InferenceSession(_gemm_graph(n), so,
                                                providers=["CPUExecutionProvider"])
                    res[str(n)] = _rate_loop(lambda: sess.run(None, {"a": a, "b": b}), flops,
                                             seconds)
                elif eng == "numpy":
                    if int(threads) != available_cpus():
                        res = {"skipped": "numpy's BLAS threads cannot be pinned at run time; "
                                          "measured only when threads = all CPUs"}
                        break
                    res[str(n)] = _rate_loop(lambda: a @ b, flops, seconds)
            except ImportError as exc:
                res = {"skipped": str(exc)}
                break
        out[eng] = res
    cands = [(eng, n, v) for eng in engines for n, v in out[eng].items()
             if isinstance(v, dict) and "gflops_max" in v]
    if not cands:
        raise DependencyError("GEMM probe: neither torch nor onnxruntime nor numpy could run")
    eng, n, v = max(cands, key=lambda c: c[2]["gflops_max"])
    sus = max(cands, key=lambda c: c[2]["gflops_median"])
    out["best"] = {"engine": eng, "size": int(n), "gflops": v["gflops_max"],
                   "sustained_engine": sus[0], "sustained_size": int(sus[1]),
                   "sustained_gflops": sus[2]["gflops_median"]}
    return out


# =============================================================================================
# video, bundle helpers
# =============================================================================================
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


def load_constants(manifest) -> Dict[str, np.ndarray]:
    """The bundle's host constants (``bg_slots``, ``seg_query_feat``)."""
    if manifest.constants is None:
        raise BundleError(f"bundle {manifest.root} has no constants file; re-export it")
    path = manifest.root / manifest.constants.file
    with np.load(path) as z:
        return {k: np.asarray(z[k]) for k in z.files}


# =============================================================================================
# outputs, parity
# =============================================================================================
@dataclass
class Instances:
    """Final instances of a clip: scores (S,), labels (S,) 0-based, track_ids (S,),
    masks bool (S, T, H, W) at the original frame size."""

    scores: np.ndarray
    labels: np.ndarray
    track_ids: np.ndarray
    masks: np.ndarray

    @classmethod
    def from_eager(cls, out: Mapping[str, Any]) -> "Instances":
        return cls(np.asarray(out["scores"], np.float32), np.asarray(out["labels"], np.int64),
                   np.asarray(out["track_ids"], np.int64), np.asarray(out["masks"], bool))

    @classmethod
    def from_video_result(cls, res) -> "Instances":
        from dvis_trt.runtime.results import decode_rle
        size = tuple(res.image_size)
        t = int(res.num_frames)
        masks = np.zeros((len(res.scores), t, *size), bool)
        for i, segs in enumerate(res.segmentations):
            masks[i] = decode_rle(segs, size)
        return cls(np.asarray(res.scores, np.float32), np.asarray(res.labels, np.int64),
                   np.asarray(res.track_ids, np.int64), masks)


def _video_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Sa, T, H, W) x (Sb, T, H, W) bool -> (Sa, Sb) video IoU (sums over all frames, as
    YouTube-VIS); two empty masks have IoU 1."""
    sa, sb = a.shape[0], b.shape[0]
    inter = np.zeros((sa, sb), np.float64)
    area_a = a.reshape(sa, -1).sum(1).astype(np.float64)
    area_b = b.reshape(sb, -1).sum(1).astype(np.float64)
    for t in range(a.shape[1]):  # frame by frame keeps the float matrices small
        fa = a[:, t].reshape(sa, -1).astype(np.float32)
        fb = b[:, t].reshape(sb, -1).astype(np.float32)
        inter += fa @ fb.T
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return iou


def compare_instances(ref: Instances, got: Instances, iou_min: float = FP32_PARITY["iou_min"],
                      score_atol: float = FP32_PARITY["score_atol"]) -> Dict[str, Any]:
    """Is ``got`` the same instance set as ``ref`` (the eager baseline)?

    Instances are paired by a Hungarian matching that maximises video mask IoU among pairs with
    equal labels. ``ok`` needs: the same number of instances and frame size, every instance
    paired with an equal label, each pair's IoU >= ``iou_min`` and score difference <=
    ``score_atol``. Track ids are reported (``track_ids_equal``) but do not decide: ids are
    labels only (DESIGN.md). Returns a dict (``ok``, ``reason``, counts, ``min_iou``,
    ``mean_iou``, ``max_score_diff``, ...).
    """
    from scipy.optimize import linear_sum_assignment
    out: Dict[str, Any] = {"ref_instances": int(len(ref.scores)),
                           "instances": int(len(got.scores)), "iou_min": iou_min,
                           "score_atol": score_atol}
    if ref.masks.shape[1:] != got.masks.shape[1:]:
        out.update(ok=False, reason=f"mask shape {got.masks.shape[1:]} != baseline "
                                    f"{ref.masks.shape[1:]}")
        return out
    if len(ref.scores) != len(got.scores):
        out.update(ok=False, reason=f"{len(got.scores)} instances, baseline has "
                                    f"{len(ref.scores)}")
    if len(ref.scores) == 0 or len(got.scores) == 0:
        out.setdefault("ok", len(ref.scores) == len(got.scores))
        out.setdefault("reason", None)
        out.update(matched=0, min_iou=None, mean_iou=None, max_score_diff=None)
        return out
    iou = _video_iou(ref.masks, got.masks)
    same = ref.labels[:, None] == got.labels[None, :]
    rows, cols = linear_sum_assignment(-(iou + 2.0 * same))
    pair_iou = iou[rows, cols]
    pair_same = same[rows, cols]
    diffs = np.abs(ref.scores[rows] - got.scores[cols])
    out.update(matched=int(pair_same.sum()), min_iou=float(pair_iou.min()),
               mean_iou=float(pair_iou.mean()), max_score_diff=float(diffs.max()),
               track_ids_equal=bool(len(ref.track_ids) == len(got.track_ids) and
                                    np.array_equal(ref.track_ids[rows], got.track_ids[cols])))
    if "ok" in out:
        return out
    if not pair_same.all():
        out.update(ok=False, reason=f"{int((~pair_same).sum())} instance(s) without an "
                                    "equal-label partner")
    elif pair_iou.min() < iou_min:
        out.update(ok=False, reason=f"mask IoU {pair_iou.min():.3f} < {iou_min}")
    elif diffs.max() > score_atol:
        out.update(ok=False, reason=f"score differs by {diffs.max():.2e} > {score_atol}")
    else:
        out.update(ok=True, reason=None)
    return out


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


class _Clock:
    """Accumulates seconds per key; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each
    reading so asynchronous GPU work is charged to the right key."""

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.sync = sync or (lambda: None)
        self.acc: Dict[str, float] = {}

    def wrap(self, key: str, fn: Callable) -> Callable:
        def timed(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.acc[key] = self.acc.get(key, 0.0) + time.perf_counter() - t0
        timed.__wrapped__ = fn
        return timed


class EagerRunner:
    """The PyTorch baseline: ``DvisDaqOffline`` (fp32, CPU), its stages timed one by one.

    ``run(frames)`` does exactly what ``DvisDaqOffline.forward`` does — ``preprocess_frames``,
    ``run_segmenter``, ``run_tracker``, ``select_instances``, ``refiner.forward_stage``,
    ``finalize`` — with a clock around each (the stage groups), and clocks around the stage
    modules inside them (segmenter module, ``tracker.forward_first`` / ``forward_step``,
    ``refiner.forward_stage`` / ``mask_head``) for the engine/host split. The smoke test checks
    the result equals ``model(frames)``.
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
        from dvis_trt.runtime.preprocess import preprocess_frames
        m = self.model
        s = m.settings
        old_window = s.segmenter_window
        s.segmenter_window = self.window
        groups = _Clock()
        engine = _Clock()
        seg_mod = m.segmenter()
        patched = {(m.tracker, "forward_first"), (m.tracker, "forward_step"),
                   (m.refiner, "forward_stage"), (m.refiner, "mask_head")}
        key_of = {"forward_first": "tracker_first", "forward_step": "tracker_step",
                  "forward_stage": "refiner", "mask_head": "mask_head"}
        for mod, attr in patched:  # instance attributes shadow the methods during the run
            object.__setattr__(mod, attr, engine.wrap(key_of[attr], getattr(mod, attr)))
        orig_forward = seg_mod.forward
        object.__setattr__(seg_mod, "forward", engine.wrap("segmenter", orig_forward))
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                h0, w0 = frames[0].shape[:2]
                images_np, (h, w) = groups.wrap("preprocess", preprocess_frames)(
                    frames, s.min_size_test, s.max_size_test, s.pixel_mean, s.pixel_std,
                    s.size_divisibility)
                images = torch.from_numpy(images_np)
                seg = groups.wrap("segmenter", m.run_segmenter)(images)
                hub = groups.wrap("tracker", m.run_tracker)(seg)
                inst, ids = groups.wrap("select", m.select_instances)(hub, seg)
                logits, mask_embed = groups.wrap("refiner", m.refiner.forward_stage)(
                    inst, seg["frame_embeds"])
                out = groups.wrap("finalize", m.finalize)(
                    logits, mask_embed, seg["mask_features"], ids, images.shape[-2:], (h, w),
                    (h0, w0), num_tracks=len(hub))
                wall = time.perf_counter() - t0
        finally:
            for mod, attr in patched:
                object.__delattr__(mod, attr)
            object.__delattr__(seg_mod, "forward")
            s.segmenter_window = old_window
        g = {k: groups.acc.get(k, 0.0) for k in STAGE_GROUPS if k != "other"}
        g["other"] = max(0.0, wall - sum(g.values()))
        return RunOutput(Instances.from_eager(out), wall, g, sum(engine.acc.values()),
                         dict(engine.acc))

    def set_min_size(self, short_edge: int) -> int:
        """Change the resize target (sweeps); returns the previous value."""
        old = self.model.settings.min_size_test
        self.model.settings.min_size_test = int(short_edge)
        return old

    def close(self) -> None:
        pass


class PipelineRunner:
    """``runtime.pipeline.OfflinePipeline`` on one backend, with the stage groups timed.

    Engine time per stage comes from the pipeline's own ``timings`` (time inside
    ``backend.run_resident``); the groups are measured by clocks on this runner's pipeline
    instance (``_track_frame``, the mask upsampler) and on the pipeline module's host helpers
    (``resize_frame``, ``normalize_and_pad``, ``minvis_link``, ``_encode_rle``), patched only
    for the duration of ``run`` and only if present.
    """

    def __init__(self, name: str, backend, manifest, window: int = 5, threads: int = 0,
                 sync: Optional[Callable[[], None]] = None):
        from dvis_trt.runtime.pipeline import OfflinePipeline, PipelineSettings
        from dvis_trt.runtime.postprocess import MaskUpsampler
        self.name = name
        self.backend = backend
        self.manifest = manifest
        self.window = int(window)
        self.sync = sync
        backend.load_all(manifest)
        settings = PipelineSettings.from_values(manifest.config.to_dict())
        self.pipeline = OfflinePipeline(backend, settings, load_constants(manifest),
                                        window=self.window,
                                        upsampler=MaskUpsampler(intra_op_threads=threads))

    @property
    def settings(self):
        return self.pipeline.s

    def run(self, frames: Sequence[np.ndarray]) -> RunOutput:
        import dvis_trt.runtime.pipeline as pl
        p = self.pipeline
        p.timings = {}
        clock = _Clock(self.sync)
        module_hooks = {"resize_frame": "preprocess", "normalize_and_pad": "preprocess",
                        "minvis_link": "select", "_encode_rle": "finalize"}
        saved = {k: getattr(pl, k) for k in module_hooks if hasattr(pl, k)}
        for k, fn in saved.items():
            setattr(pl, k, clock.wrap(module_hooks[k], fn))
        track = p._track_frame
        ups = p.upsampler
        p._track_frame = clock.wrap("tracker", track)
        p.upsampler = clock.wrap("finalize", ups)
        try:
            t0 = time.perf_counter()
            res = p.run_video(frames)
            if self.sync:
                self.sync()
            wall = time.perf_counter() - t0
        finally:
            for k, fn in saved.items():
                setattr(pl, k, fn)
            del p._track_frame
            p.upsampler = ups
        t = dict(p.timings)
        g = {k: clock.acc.get(k, 0.0) for k in STAGE_GROUPS if k != "other"}
        g["segmenter"] += t.get("segmenter", 0.0)
        g["refiner"] += t.get("refiner", 0.0)
        g["finalize"] += t.get("mask_head", 0.0)
        g["other"] = max(0.0, wall - sum(g.values()))
        return RunOutput(Instances.from_video_result(res), wall, g, sum(t.values()), t)

    def set_min_size(self, short_edge: int) -> int:
        old = self.pipeline.s.min_size_test
        self.pipeline.s.min_size_test = int(short_edge)
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


def _torch_backend_class(kind: str):
    """TorchBackend, or a subclass running the stages under autocast fp16 / torch.compile."""
    from dvis_trt.runtime.backends.torch_backend import TorchBackend
    if kind == "torch-stages":
        return TorchBackend

    class _Variant(TorchBackend):
        name = kind

        def _ensure_model(self, manifest) -> None:
            fresh = self._modules is None
            super()._ensure_model(manifest)
            if fresh and kind == "torch-compile":
                import torch
                self._modules = {k: torch.compile(v, dynamic=True)
                                 for k, v in self._modules.items()}

        def run(self, stage_name, inputs):
            if kind != "torch-fp16":
                return super().run(stage_name, inputs)
            import torch
            with torch.autocast("cuda", dtype=torch.float16):
                out = super().run(stage_name, inputs)
            return {k: (v.astype(np.float32) if v.dtype == np.float16 else v)
                    for k, v in out.items()}
    return _Variant


def make_pipeline_runner(name: str, manifest, *, model=None, threads: int,
                         window: int) -> PipelineRunner:
    """A :class:`PipelineRunner` for backend ``name`` on a loaded bundle manifest.

    Raises :class:`BackendUnavailable` (with the reason) when this machine cannot run it.
    """
    if name == "ort" or name.startswith("ort-"):
        from dvis_trt.runtime.backends.ort_backend import OrtBackend
        providers = {"ort": ("cpu",), "ort-cuda": ("cuda",), "ort-trt": ("tensorrt", "cuda")}[name]
        if manifest.msda == "trt-builtin":
            raise BackendUnavailable("ONNX Runtime cannot run --msda trt-builtin bundles")
        try:
            backend = OrtBackend(providers, threads=threads)
        except DependencyError as exc:
            raise BackendUnavailable(str(exc)) from None
        return PipelineRunner(name, backend, manifest, window, threads)
    if name == "trt":
        try:
            from dvis_trt.runtime.backends.trt_backend import TrtBackend
            backend = TrtBackend()
            return PipelineRunner(name, backend, manifest, window, threads)
        except (DependencyError, BundleError, ImportError) as exc:
            raise BackendUnavailable(f"{exc}".splitlines()[0]) from None
    if name in ("torch-stages", "torch-fp16", "torch-compile"):
        if model is None:
            raise BackendUnavailable("needs the eager model (--checkpoint or --test-weights)")
        cuda = _torch_cuda()
        if name == "torch-fp16" and not cuda:
            raise BackendUnavailable("autocast fp16 rows need CUDA (no GPU here)")
        if name == "torch-compile" and not cuda:
            raise BackendUnavailable("torch.compile rows are GPU-only in this harness (on a "
                                     "2-core CPU inductor compiles for many minutes per shape)")
        cls = _torch_backend_class(name)
        backend = cls(model=model, device="cuda" if cuda else "cpu", threads=threads)
        return PipelineRunner(name, backend, manifest, window, threads,
                              sync=_cuda_sync() if cuda else None)
    raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


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
    bundles), one warm-up call, one profiled call. Returns ``{"total_s", "ops": [{"op", "s",
    "share", "calls"}]}`` (op types after ORT's fusions, e.g. ``FusedMatMul``)."""
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
        sess = ort.InferenceSession(str(manifest.stage_path(stage)), so,
                                    providers=["CPUExecutionProvider"])
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


# =============================================================================================
# the whole benchmark
# =============================================================================================
@dataclass
class BenchOptions:
    """What :func:`run_bench` does. Paths are strings or Paths. See ``dvis-trt bench -h``."""

    bundles: Sequence[Any]
    video: Any
    backends: Sequence[str] = ("torch", "ort")
    checkpoint: Optional[Any] = None
    test_weights: Optional[int] = None
    config_file: Optional[Any] = None
    overrides: Sequence[str] = ()
    threads: Optional[int] = None
    affinity: bool = False
    max_frames: Optional[int] = None
    window: int = 5
    warmup: int = 1
    repeats: int = 3
    stage_iters: int = 10
    stage_budget: float = 30.0
    stages: bool = True
    flops: bool = True
    gemm_seconds: float = 2.0
    gemm_sizes: Sequence[int] = (1024, 2048)
    memory: str = "inprocess"
    parity_iou: float = FP32_PARITY["iou_min"]
    parity_score_atol: float = FP32_PARITY["score_atol"]
    profile_ops: bool = False
    profile_stage: str = "segmenter"
    sweep: bool = False
    sweep_frames: Sequence[int] = (12, 48, 192)
    sweep_sizes: Sequence[int] = (360, 480, 720)
    sweep_backends: Optional[Sequence[str]] = None
    sweep_repeats: int = 1
    label: Optional[str] = None
    argv: Optional[Sequence[str]] = None
    log: Callable[[str], None] = print


def build_eager_model(manifest, opts: BenchOptions):
    """The eager baseline model for a bundle: ``--checkpoint`` (strict load) or
    ``--test-weights SEED`` (``export.testing.build_test_model``), config from ``--config-file``
    or the manifest's ``config.source`` + recorded overrides. The model's host constants must
    equal the bundle's (else the two come from different weights). Returns None when neither
    weights option is given and the manifest records no checkpoint."""
    import torch
    from dvis_trt.export.named_configs import eager_config_source, load_named_config
    from dvis_trt.runtime.provenance import recorded_checkpoint
    ckpt = opts.checkpoint
    if ckpt is None and opts.test_weights is None:
        ckpt = recorded_checkpoint(manifest)  # None if absent; refused if the file changed
    if ckpt is None and opts.test_weights is None:
        return None
    if opts.config_file is not None:
        source, overrides = os.fspath(opts.config_file), list(opts.overrides or [])
    else:
        source, recorded = eager_config_source(manifest)
        overrides = list(opts.overrides or []) or recorded
        if not source or not Path(source).is_file():
            raise InputError(f"config file {source!r} (from the bundle manifest) is not "
                             "readable; pass --config")
    cfg = load_named_config(source, overrides or None)
    if ckpt is not None:
        from dvis_trt.export.checkpoint import load_checkpoint
        from dvis_trt.export.model.build import build_model
        model = build_model(cfg)
        load_checkpoint(model, ckpt, strict=True, config_name=str(source))
    else:
        from dvis_trt.export.testing import build_test_model
        model = build_test_model(cfg, seed=int(opts.test_weights))
    model.eval()
    consts = load_constants(manifest)
    mine = {"bg_slots": model.tracker.bg_slots.weight,
            "seg_query_feat": model.sem_seg_head.predictor.query_feat.weight}
    for k, v in mine.items():
        if k in consts and (consts[k].shape != tuple(v.shape) or
                            not np.allclose(consts[k], v.detach().float().numpy(), atol=1e-6)):
            raise InputError(f"the eager model's {k} differs from bundle {manifest.root}'s: "
                             "checkpoint / --test-weights and bundle come from different "
                             "weights; pass the checkpoint the bundle was exported from")
    torch.set_grad_enabled(False)
    return model


def _row_key(backend: str, msda: str, multi: bool) -> str:
    return f"{backend}[msda={msda}]" if multi and backend != "torch" else backend


def _memory_probe(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Run one backend once in a fresh process; returns its peak RSS (sampled every 10 ms) and
    the RSS after loading (model / sessions) but before the run."""
    code = ("import json,sys; from dvis_trt.benchmarks.harness import _memory_probe_main; "
            "print(json.dumps(_memory_probe_main(json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_probe_main(spec: Mapping[str, Any]) -> Dict[str, Any]:
    import psutil
    from dvis_trt.runtime.manifest import load_manifest
    opts = BenchOptions(bundles=[spec["bundle"]], video=spec["video"],
                        checkpoint=spec.get("checkpoint"), test_weights=spec.get("test_weights"),
                        config_file=spec.get("config_file"), overrides=spec.get("overrides") or (),
                        window=spec["window"], log=lambda s: None)
    frames, _ = decode_video(spec["video"], spec.get("max_frames"))
    manifest = load_manifest(spec["bundle"], verify=False)
    if spec["backend"] == "torch" or spec["backend"].startswith("torch-"):
        import torch  # noqa: F401 - so pin_threads sets torch's threads
    pin_threads(spec["threads"])
    model = None
    if spec["backend"] == "torch" or spec["backend"].startswith("torch-"):
        model = build_eager_model(manifest, opts)
    runner = EagerRunner(model, spec["window"]) if spec["backend"] == "torch" else \
        make_pipeline_runner(spec["backend"], manifest, model=model, threads=spec["threads"],
                             window=spec["window"])
    gc.collect()
    loaded = psutil.Process().memory_info().rss
    with MemorySampler(interval=0.005) as mem:
        runner.run(frames)
    # not ru_maxrss: after fork+exec it still carries the parent's high-water mark
    peak = mem.peak_rss
    return {"rss_loaded_mb": loaded / 2**20, "peak_rss_mb": peak / 2**20,
            "run_growth_mb": (peak - loaded) / 2**20, **{k: v for k, v in mem.to_dict().items()
                                                        if "gpu" in k or "cuda" in k}}


def run_bench(opts: BenchOptions) -> Dict[str, Any]:
    """Run the benchmark; returns one result record (JSON-able; schema in docs/benchmarks.md).

    Order: pin threads; decode the video once (frames shared by every backend); build the
    runners (unavailable backends become ``skipped`` rows); one untimed run per runner (warm-up,
    also the parity output and, for the first engine backend, the captured stage inputs and
    the stage calls for the FLOP count); ``repeats`` alternated timed rounds, each = decode +
    run; parity of every row against the eager baseline; the per-stage micro-benchmark; the
    GEMM probe; FLOPs; the optional sweep.
    """
    from dvis_trt.runtime.manifest import load_manifest
    log = opts.log
    unknown = [b for b in opts.backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if not opts.bundles:
        raise InputError("pass at least one --bundle")
    if opts.memory not in ("inprocess", "isolated", "off"):
        raise InputError(f"--memory must be inprocess, isolated or off, got {opts.memory!r}")
    if int(opts.repeats) < 1 or int(opts.window) < 1:
        raise InputError("--repeats and --window must be >= 1")
    started = _dt.datetime.now(_dt.timezone.utc)
    from dvis_trt.runtime.extras import have, missing_message
    has_torch = have("torch")  # an edge install benches ONNX Runtime rows without torch
    if has_torch:
        import torch  # noqa: F401 - imported before pinning so torch's pools get the count
    threads = int(opts.threads or available_cpus())
    pinned = pin_threads(threads, opts.affinity)
    manifests = [load_manifest(b, verify=False) for b in opts.bundles]
    primary = manifests[0]
    multi = len(manifests) > 1
    log(f"threads: {threads} (torch {pinned.get('torch_threads')}, ORT intra-op {threads}); "
        f"bundle {primary.root} (msda={primary.msda})")

    frames, decode_s = decode_video(opts.video, opts.max_frames)
    h0, w0 = frames[0].shape[:2]
    from dvis_trt.runtime.preprocess import padded_shape, resize_shortest_edge_shape
    cfg = primary.config
    hr, wr = resize_shortest_edge_shape(h0, w0, cfg.min_size_test, cfg.max_size_test)
    hp, wp = padded_shape(hr, wr, cfg.size_divisibility)
    log(f"video {opts.video}: {len(frames)} frames of {h0}x{w0} -> {hr}x{wr} "
        f"(padded {hp}x{wp}); decode {decode_s:.2f} s")

    # the eager model is built whatever --backends says: it is the parity reference
    if has_torch:
        model = build_eager_model(primary, opts)
        if model is None:
            log("no --checkpoint / --test-weights and the manifest records no readable "
                "checkpoint: no eager baseline, parity unchecked")
    else:
        model = None
        log(f"no eager baseline, parity unchecked: {missing_message('torch', 'bench', ' for it')}")

    # ---- runners
    rows: Dict[str, Dict[str, Any]] = {}
    runners: Dict[str, Any] = {}
    for b in opts.backends:
        for mi, man in enumerate(manifests):
            if b == "torch" and mi > 0:
                continue
            key = _row_key(b, man.msda, multi)
            rows[key] = {"backend": b, "msda": None if b == "torch" else man.msda,
                         "bundle": str(man.root), "description": BACKENDS[b]}
            try:
                if b == "torch":
                    if not has_torch:
                        raise BackendUnavailable(missing_message("torch", "bench"))
                    if model is None:
                        raise BackendUnavailable("the eager baseline needs --checkpoint or "
                                                 "--test-weights")
                    runners[key] = EagerRunner(model, opts.window)
                else:
                    runners[key] = make_pipeline_runner(b, man, model=model, threads=threads,
                                                        window=opts.window)
                rows[key]["precision"] = "fp16 (autocast)" if b == "torch-fp16" else \
                    ("fp32" if b.startswith("torch") else man.precision)
            except BackendUnavailable as exc:
                rows[key]["skipped"] = str(exc)
                log(f"{key}: skipped ({exc})")
    baseline = EagerRunner(model, opts.window) if model is not None else None

    # ---- warm-up + parity reference + captured stage inputs
    ref_out = None
    if baseline is not None:
        if "torch" in runners:
            baseline = runners["torch"]
        log("baseline (eager torch) reference run ...")
        ref_out = baseline.run(frames)
        rows.setdefault("torch", {"backend": "torch"})["reference_wall_s"] = ref_out.wall
    recorder = None
    outputs: Dict[str, RunOutput] = {}
    for key, r in runners.items():
        if key == "torch" and ref_out is not None:
            outputs[key] = ref_out
            continue
        log(f"{key}: warm-up / parity run ...")
        if recorder is None and isinstance(r, PipelineRunner):
            recorder, outputs[key] = capture_stage_inputs(r, frames)
            recorder_manifest = r.manifest
        else:
            outputs[key] = r.run(frames)
    for _ in range(max(0, opts.warmup - 1)):
        for r in runners.values():
            r.run(frames)

    for key, out in outputs.items():
        row = rows[key]
        if ref_out is None:
            row["parity"] = {"ok": None, "reason": "no eager baseline"}
            row["valid"] = None
            continue
        if key == "torch":
            row["parity"] = {"ok": True, "reason": "is the baseline"}
            row["valid"] = True
            continue
        bounds = LOWP_PARITY if row["backend"] in LOWP_BACKENDS else \
            {"iou_min": opts.parity_iou, "score_atol": opts.parity_score_atol}
        row["parity"] = compare_instances(ref_out.instances, out.instances, **bounds)
        row["valid"] = bool(row["parity"]["ok"])
        log(f"{key}: parity {'OK' if row['valid'] else 'MISMATCH: ' + str(row['parity']['reason'])}")

    # ---- timed alternated rounds (decode + run)
    samples: Dict[str, Dict[str, List[float]]] = {
        k: {"wall": [], "decode": [], "engine": [], "host": [], "cpu_util": [], "loadavg": [],
            "stage_calls": [],
            **{g: [] for g in STAGE_GROUPS}} for k in runners}
    mems: Dict[str, MemorySampler] = {}

    def one(key: str) -> Callable[[], float]:
        def go() -> float:
            fr, dec = decode_video(opts.video, opts.max_frames)
            gc.collect()
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            cpu0 = time.process_time()
            if opts.memory == "inprocess":
                with MemorySampler() as mem:
                    out = runners[key].run(fr)
                prev = mems.get(key)
                if prev is None or mem.peak_rss > prev.peak_rss:
                    mems[key] = mem
            else:
                out = runners[key].run(fr)
            s = samples[key]
            # CPU seconds of this process / (wall * threads): well below 1 means other
            # processes took the cores (spin-waiting thread pools count as busy)
            s["cpu_util"].append((time.process_time() - cpu0) / max(out.wall * threads, 1e-9))
            s["stage_calls"].append(dict(out.stage_calls))
            s["loadavg"].append(load)
            s["wall"].append(out.wall)
            s["decode"].append(dec)
            s["engine"].append(out.engine)
            s["host"].append(out.host)
            for g in STAGE_GROUPS:
                s[g].append(out.groups.get(g, 0.0))
            return out.wall
        return go

    timed = [k for k in runners if rows[k].get("valid") is not False]
    for k in runners:
        if rows[k].get("valid") is False:
            rows[k]["timing"] = "not reported: output differs from the eager baseline"
    if timed:
        log(f"timed rounds: {opts.repeats} x {', '.join(timed)} (alternating order)")
        walls = alternate({k: one(k) for k in timed}, opts.repeats,
                          on_run=lambda n, r, s: log(f"  round {r + 1} {n}: {s:.2f} s"))
    else:
        walls = {}
    nf = len(frames)
    for k in timed:
        s = samples[k]
        row = rows[k]
        wall = summarize(s["wall"])
        fast = int(np.argmin(s["wall"]))
        incl = [w + d for w, d in zip(s["wall"], s["decode"])]
        row.update({
            "frames": nf, "wall_s": wall, "decode_s": summarize(s["decode"]),
            "wall_with_decode_s": summarize(incl),
            "fps": nf / wall["p50"], "fps_with_decode": nf / float(np.median(incl)),
            "engine_s": summarize(s["engine"]), "host_s": summarize(s["host"]),
            "cpu_util": summarize(s["cpu_util"]), "loadavg_1min": s["loadavg"],
            "groups_s": {g: float(np.median(s[g])) for g in STAGE_GROUPS},
            # the least disturbed (fastest) round, whose groups add up to its wall time
            "fastest_round": {"wall_s": min(s["wall"]), "engine_s": s["engine"][fast],
                              "host_s": s["host"][fast],
                              "groups_s": {g: s[g][fast] for g in STAGE_GROUPS}},
            "stage_calls_s": s["stage_calls"][fast],
        })
        if k in mems:
            row["memory"] = mems[k].to_dict()
            row["memory"]["mode"] = "inprocess"
    ratios: Dict[str, Any] = {}
    if "torch" in walls:
        for k in timed:
            if k != "torch":
                ratios[f"{k} vs torch"] = {
                    "metric": "speedup = torch wall / row wall, per round",
                    **ratio_summary([a / b for a, b in zip(walls["torch"], walls[k])]),
                    # on a shared machine the fastest round of each is the least disturbed one
                    "of_fastest": min(walls["torch"]) / min(walls[k])}

    if opts.memory == "isolated":
        for k in timed:
            log(f"{k}: isolated memory probe ...")
            spec = {"backend": rows[k]["backend"], "bundle": rows[k]["bundle"],
                    "video": str(opts.video), "max_frames": opts.max_frames,
                    "threads": threads, "window": opts.window,
                    "checkpoint": None if opts.checkpoint is None else str(opts.checkpoint),
                    "test_weights": opts.test_weights,
                    "config_file": None if opts.config_file is None else str(opts.config_file),
                    "overrides": list(opts.overrides or [])}
            rows[k]["memory"] = {"mode": "isolated", **_memory_probe(spec)}

    # ---- per-stage micro-benchmark on the captured inputs
    stage_res: Dict[str, Any] = {}
    if opts.stages and recorder is not None:
        stage_backends: Dict[str, Any] = {}
        syncs: Dict[str, Callable[[], None]] = {}
        if model is not None and "torch" in opts.backends:
            from dvis_trt.runtime.backends.torch_backend import TorchBackend
            tb = TorchBackend(model=model, threads=threads)
            tb.load_all(recorder_manifest)
            stage_backends["torch"] = tb
        for k in timed:
            r = runners[k]
            if isinstance(r, PipelineRunner):
                stage_backends[k] = r.backend
                if r.sync:
                    syncs[k] = r.sync
        log(f"per-stage micro-benchmark: {', '.join(stage_backends)}")
        stage_res = bench_stages(stage_backends, recorder.samples, iters=opts.stage_iters,
                                 warmup=1, budget_s=opts.stage_budget, sync=syncs)

    # ---- op-type profile of one stage (where its time goes inside each backend)
    op_profile: Dict[str, Any] = {}
    if opts.profile_ops and recorder is not None and opts.profile_stage in recorder.samples:
        st_in = recorder.samples[opts.profile_stage]
        log(f"op-type profile of {opts.profile_stage} ...")
        if model is not None and "torch" in runners:
            op_profile["torch"] = profile_torch_stage(model, opts.profile_stage, st_in)
        for k in timed:
            if rows[k]["backend"] == "ort":
                man = next(m for m in manifests if str(m.root) == rows[k]["bundle"])
                op_profile[k] = profile_ort_stage(man, opts.profile_stage, st_in, threads)
        op_profile = {"stage": opts.profile_stage,
                      "inputs": {k: list(v.shape) for k, v in st_in.items()},
                      "backends": op_profile}

    # ---- GEMM rate + FLOPs
    log("GEMM probe ...")
    gemm = gemm_rate(threads, sizes=opts.gemm_sizes, seconds=opts.gemm_seconds)
    flops_res: Dict[str, Any] = {}
    if opts.flops and recorder is not None and not have("onnx"):
        log(f"FLOP count skipped: {missing_message('onnx', 'bench', ' to read the graphs')}")
    elif opts.flops and recorder is not None:
        from .flops import FlopCounter
        log("FLOP count from the ONNX graphs ...")
        fc = FlopCounter()
        # count on the onnx-mode graphs when there is one (same model, plain ops)
        fman = next((m for m in manifests if m.msda == "onnx"), recorder_manifest)
        paths = {s: fman.stage_path(s) for s in ENGINE_STAGES if s in fman.stages}
        totals = fc.stage_totals(paths, recorder.calls)
        rate = gemm["best"]["gflops"] * 1e9
        per_stage = {}
        for stage, gf in totals.items():
            calls = sum(1 for c in recorder.calls if c[0] == stage)
            per_stage[stage] = {"calls": calls, "gflops_total": gf.total / 1e9,
                                "gemm_gflops_total": gf.gemm / 1e9,
                                "other_gflops_total": gf.other / 1e9,
                                "gemm_gflops_per_frame": gf.gemm / 1e9 / nf,
                                "other_gflops_per_frame": gf.other / 1e9 / nf,
                                "compute_bound_min_s": gf.gemm / rate,
                                "unresolved_nodes": gf.unresolved[:20],
                                "top_ops": dict(list(gf.to_dict()["by_op"].items())[:6])}
        for stage, st in stage_res.items():
            if stage in paths:
                shapes = {k: tuple(v) for k, v in st["_shapes"].items()}
                gf = fc(paths[stage], shapes)
                st["_flops"] = {"gemm_gflops": gf.gemm / 1e9, "other_gflops": gf.other / 1e9,
                                "compute_bound_min_s": gf.gemm / rate}
                for n, v in st.items():
                    if not n.startswith("_") and gf.gemm > 0:
                        v["x_compute_bound"] = v["p50"] / (gf.gemm / rate)
        flops_res = {"method": "ONNX graphs at the run's real input shapes; shapes by onnx + "
                               "onnxruntime symbolic shape inference (benchmarks/flops.py)",
                     "graphs_msda": fman.msda, "frames": nf, "stages": per_stage,
                     "gemm_gflops_per_frame": sum(v["gemm_gflops_per_frame"]
                                                  for v in per_stage.values()),
                     "gemm_rate_gflops": gemm["best"]["gflops"]}
        group_stages = {"segmenter": ("segmenter",), "tracker": ("tracker_first", "tracker_step"),
                        "refiner": ("refiner",), "finalize": ("mask_head",)}
        for k in timed:
            fr = rows[k].get("fastest_round", {})  # least disturbed round
            gs = fr.get("groups_s", {})
            xs = {}
            for g, sts in group_stages.items():
                mn = sum(per_stage[s]["compute_bound_min_s"] for s in sts if s in per_stage)
                if mn > 0 and gs.get(g):
                    xs[g] = gs[g] / mn
            total_min = sum(v["compute_bound_min_s"] for v in per_stage.values())
            if total_min > 0:
                xs["total"] = fr["wall_s"] / total_min
            rows[k]["x_compute_bound"] = xs

    record: Dict[str, Any] = {
        "schema": SCHEMA,
        "id": started.strftime("%Y%m%dT%H%M%SZ"),
        "started": started.isoformat(timespec="seconds"),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "label": opts.label,
        "command": list(opts.argv) if opts.argv is not None else None,
        "machine": system_info(),
        "threads": pinned,
        "settings": {
            "bundles": [str(m.root) for m in manifests], "msda": [m.msda for m in manifests],
            "precision": [m.precision for m in manifests], "config": cfg.source,
            "num_queries": cfg.num_queries, "num_classes": cfg.num_classes,
            "video": str(opts.video), "frames": nf, "video_size": [h0, w0],
            "resized": [hr, wr], "padded": [hp, wp], "window": opts.window,
            "warmup": opts.warmup, "repeats": opts.repeats, "stage_iters": opts.stage_iters,
            "stage_budget_s": opts.stage_budget, "memory": opts.memory,
            "weights": (f"checkpoint {opts.checkpoint}" if opts.checkpoint else
                        f"test weights seed {opts.test_weights}"
                        if opts.test_weights is not None else None),
            "parity": {"iou_min": opts.parity_iou, "score_atol": opts.parity_score_atol,
                       "reduced_precision": LOWP_PARITY},
        },
        "e2e": rows,
        "ratios": ratios,
        "stages": stage_res,
        "op_profile": op_profile,
        "gemm": gemm,
        "flops": flops_res,
    }
    if opts.sweep:
        from .sweep import run_sweep
        sweep_names = list(opts.sweep_backends or [k for k in timed])
        sweep_runners = {k: runners[k] for k in sweep_names if k in runners}
        record["sweep"] = run_sweep(sweep_runners, frame_counts=opts.sweep_frames,
                                    sizes=opts.sweep_sizes, base_size=(h0, w0),
                                    repeats=opts.sweep_repeats, log=log)
    record["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") \
        else None
    for r in runners.values():
        r.close()
    return record
