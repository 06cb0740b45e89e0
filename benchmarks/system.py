"""The machine side of a benchmark: statistics of samples, thread pinning, the machine / version
record, memory sampling and the sustained-GEMM probe."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from dvis_trt.errors import DependencyError, InputError


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
