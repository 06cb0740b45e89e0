"""ONNX Runtime backend: runs a bundle's per-stage ONNX graphs (no torch).

Execution providers: CPU by default; CUDA is picked up automatically when the installed
onnxruntime has it (``onnxruntime-gpu``). TensorRT's execution provider is used only when asked
for (``providers=("tensorrt", "cuda", "cpu")``): it compiles an engine per stage and input
shape at session creation (minutes), which a default must not do behind the user's back — the
TensorRT path of this project is ``dvis-trt build`` + the TensorRT backend.

Bundles exported with ``--msda plugin`` hold ``dvis_trt::DvisMSDeformAttn`` nodes; this backend
registers the MSDA CPU twin (:mod:`dvis_trt.plugins.ort_op`, onnxruntime-extensions) for them.
``--msda trt-builtin`` bundles run only in TensorRT.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dvis_trt.errors import BundleError, DependencyError, InputError
from .base import Backend, check_inputs

__all__ = ["OrtBackend", "PROVIDER_NAMES", "resolve_providers", "default_graph_cache",
           "prune_graph_cache", "graph_cache_max_bytes", "int8_saturation_warning"]

#: Graph optimizers disabled for int8 bundles (must match dvis_trt.export.quantize).
INT8_DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]
#: Short provider names accepted by :class:`OrtBackend`.
#: Input dims that change from one frame to the next: ``tQ``, the live-track count of
#: ``tracker_step``. Sessions of stages with such an input run without ORT's memory pattern
#: and CPU arena (see :meth:`OrtBackend._session_options`).
PER_FRAME_DIMS = frozenset({"tQ"})
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise DependencyError("the ONNX Runtime backend needs onnxruntime: pip install "
                              "onnxruntime (or onnxruntime-gpu)") from exc
    return ort


def resolve_providers(providers: Union[str, Sequence[str], None] = "auto") -> list:
    """Full ORT provider names for ``providers``.

    ``"auto"`` / ``None``: CUDA (if this onnxruntime has it) then CPU. Otherwise a list (or a
    comma-separated string) of short names (``cpu``, ``cuda``, ``tensorrt``) or full names, in
    priority order; CPU is appended when missing (it runs whatever the others cannot).
    Raises :class:`DependencyError` for a provider this onnxruntime build lacks, and
    :class:`InputError` for an unknown name.
    """
    available = set(_ort().get_available_providers())
    if providers is None or providers == "auto":
        out = [p for p in ("CUDAExecutionProvider",) if p in available]
        return out + ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    out = []
    for p in providers:
        full = PROVIDER_NAMES.get(p.lower(), p)
        if full not in PROVIDER_NAMES.values() and not full.endswith("ExecutionProvider"):
            raise InputError(f"unknown ONNX Runtime provider {p!r}; use "
                             f"{', '.join(sorted(set(PROVIDER_NAMES)))} or a full provider name")
        if full not in available:
            raise DependencyError(f"ONNX Runtime provider {full} is not available in this "
                                  f"onnxruntime build (available: {', '.join(sorted(available))})"
                                  "; install onnxruntime-gpu for CUDA/TensorRT")
        if full not in out:
            out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


#: Default size cap of the optimized-graph cache (``$DVIS_TRT_ORT_GRAPH_CACHE_MAX_GB``): every
#: re-export makes new entries (the key holds the stage file's identity), so without a cap the
#: cache would only grow (a ViT-L bundle's optimized graphs are ~1.4 GB).
GRAPH_CACHE_MAX_GB = 4.0
_GRAPH_ENTRY_RE = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{24}\.ort\.onnx$")


def graph_cache_max_bytes() -> int:
    """The cache's size cap in bytes: ``$DVIS_TRT_ORT_GRAPH_CACHE_MAX_GB`` (GB, > 0), else
    :data:`GRAPH_CACHE_MAX_GB`. Raises :class:`InputError` for a value that is not a positive
    finite number."""
    env = os.environ.get("DVIS_TRT_ORT_GRAPH_CACHE_MAX_GB")
    if env is None or not env.strip():
        return int(GRAPH_CACHE_MAX_GB * 1e9)
    try:
        gb = float(env)
    except ValueError:
        gb = float("nan")
    if not (gb > 0 and gb < float("inf")):
        raise InputError(f"DVIS_TRT_ORT_GRAPH_CACHE_MAX_GB must be a positive number of GB, "
                         f"got {env!r}")
    return int(gb * 1e9)


def prune_graph_cache(folder: Union[str, os.PathLike], max_bytes: int,
                      keep: Optional[str] = None) -> list:
    """Keep ORT's optimized-graph cache under ``max_bytes``: delete the least recently used
    entries (a hit refreshes an entry's mtime), never ``keep`` (the entry just written or
    used), and temporaries of processes that no longer run
    (:func:`dvis_trt.outputs.clean_stale_temps`). Only file names of the cache's own form
    (``<stage>-<24 hex>.ort.onnx``) are ever deleted, so a folder the user pointed
    ``$DVIS_TRT_ORT_GRAPH_CACHE`` at keeps its other files. Returns the deleted paths; errors
    (a file gone, no permission) are ignored: the cache only costs or saves speed."""
    from dvis_trt.outputs import clean_stale_temps

    removed = [str(p) for p in clean_stale_temps(folder)]
    entries = []
    try:
        for e in os.scandir(folder):
            if _GRAPH_ENTRY_RE.match(e.name) and e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                entries.append((st.st_mtime, st.st_size, e.path))
    except OSError:
        return removed
    keep_real = os.path.realpath(keep) if keep else None
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):  # oldest first
        if total <= max_bytes:
            break
        if keep_real and os.path.realpath(path) == keep_real:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed


def _cpu_flags_line() -> str:
    """The ``flags`` line of ``/proc/cpuinfo`` ("" where there is none: not Linux x86)."""
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ""


#: CPU flags of int8 dot-product instructions (x86): with one of them, ONNX Runtime's int8
#: kernels keep full-range (8-bit) weights exact; without (plain AVX2/AVX-512), its u8 x s8
#: multiply-adds saturate on full-range weights (docs/benchmarks.md, INT8).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_saturation_warning(manifest, flags_line: Optional[str] = None) -> Optional[str]:
    """One line for an int8 bundle quantized with full-range weights (no ``--reduce-range``)
    about to run on an x86 CPU without VNNI, else None. ``flags_line``: a ``/proc/cpuinfo``
    flags line (default: this machine's); no flags known (not x86 Linux): None."""
    if getattr(manifest, "precision", None) != "int8":
        return None
    quant = (getattr(manifest, "producer", None) or {}).get("quantization") or {}
    if quant.get("reduce_range"):
        return None
    flags = set((_cpu_flags_line() if flags_line is None else flags_line).split())
    if "avx2" not in flags or flags & VNNI_FLAGS:
        return None
    return (f"dvis-trt: warning: int8 bundle {manifest.root} has full-range int8 weights and "
            "this CPU has no VNNI: ONNX Runtime's int8 kernels saturate here and accuracy drops; "
            "re-quantize with `dvis-trt quantize ... --reduce-range` for this CPU (TensorRT "
            "engines are not affected)")


def default_graph_cache() -> Optional[str]:
    """Folder of ORT's optimized stage graphs: ``$DVIS_TRT_ORT_GRAPH_CACHE`` (``0`` / ``off``
    disables the cache), else ``<user cache>/ort-graphs`` (the user cache is
    ``$DVIS_TRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/dvis_trt``, else ``~/.cache/dvis_trt``)."""
    env = os.environ.get("DVIS_TRT_ORT_GRAPH_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "no", "false") else env
    from dvis_trt.fileio import user_cache_dir

    return str(user_cache_dir() / "ort-graphs")


class OrtBackend(Backend):
    """Runs bundle stages in ONNX Runtime sessions (one per stage).

    Args:
        providers: ``"auto"`` (CUDA if available, then CPU), or names in priority order (see
            :func:`resolve_providers`).
        threads: intra-op threads per session (default: ORT's choice, all cores).
        optimization: graph optimisation level ``"all"`` (default), ``"extended"``, ``"basic"``
            or ``"disable"``.
        plugin_library: not needed normally; a custom-op library path to register in addition
            (e.g. a locally built one) on every session.
        graph_cache: folder where the graph ORT optimizes at session creation is kept, so the
            next session of the same stage file on this machine loads it as is (R50: see
            docs/benchmarks.md, "Time to first result"); ``"auto"`` (default):
            :func:`default_graph_cache`; None: no cache. CPU provider only. Kept under
            :func:`graph_cache_max_bytes` (least recently used entries go first).
    """

    name = "ort"

    def __init__(self, providers: Union[str, Sequence[str], None] = "auto", *,
                 threads: Optional[int] = None, optimization: str = "all",
                 plugin_library: Optional[Union[str, os.PathLike]] = None,
                 graph_cache: Optional[Union[str, os.PathLike]] = "auto"):
        ort = _ort()
        self.providers = resolve_providers(providers)
        if threads is not None and int(threads) < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise InputError(f"optimization must be one of {', '.join(levels)}, got "
                             f"{optimization!r}")
        self.threads = None if threads is None else int(threads)
        self._level = levels[optimization]
        self.plugin_library = None if plugin_library is None else os.fspath(plugin_library)
        self.graph_cache = default_graph_cache() if graph_cache == "auto" else \
            (None if graph_cache is None else os.fspath(graph_cache))
        self._cache_max = graph_cache_max_bytes() if self.graph_cache else 0
        self._warned_int8 = False
        #: seconds each stage's session took to create, and whether it came from the cache
        self.session_seconds: Dict[str, Tuple[float, bool]] = {}
        self._sessions: Dict[str, "object"] = {}
        self._specs: Dict[str, object] = {}
        self._outputs: Dict[str, Tuple[str, ...]] = {}

    # -- loading ---------------------------------------------------------------------------
    def _session_options(self, msda: str, per_frame_shapes: bool = False):
        """ORT session options of one stage. ``per_frame_shapes``: the stage gets a new input
        shape on most frames (``tracker_step``, whose ``tQ`` is the live-track count). ORT's
        memory pattern (one plan cached per input shape) and its CPU arena (grown to each new
        largest request, never returned) would then keep the peak of every shape seen: on the
        R50 OVIS test bundle, 40 frames of a 64x96 video (tQ 93 -> 3,068) peaked at 2,130 MiB
        with both, 1,416 MiB with the arena off, 1,372 MiB with both off, results byte-identical
        (docs/safety.md). Outputs do not depend on either option."""
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = self._level
        so.log_severity_level = 3
        if per_frame_shapes:
            so.enable_mem_pattern = False
            so.enable_cpu_mem_arena = False
        if self.threads is not None:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if msda == "plugin":
            try:
                from dvis_trt.plugins.ort_op import session_options
            except ImportError as exc:
                raise DependencyError("this bundle was exported with --msda plugin and needs the "
                                      "MSDA CPU twin (dvis_trt.plugins.ort_op), which cannot be "
                                      f"imported ({exc}); pip install 'dvis-trt[plugin]' or "
                                      "re-export with --msda onnx") from exc
            so = session_options(so)
        if self.plugin_library is not None:
            if not os.path.isfile(self.plugin_library):
                raise DependencyError(f"custom-op library {self.plugin_library} does not exist; "
                                      "build it with `dvis-trt build-plugins`")
            so.register_custom_ops_library(self.plugin_library)
        return so

    def _graph_cache_paths(self, stage_name: str, manifest):
        """(cached optimized graph, or None) for ``graph_cache``: the graph ORT produced at
        session creation (all optimizations applied, hardware-specific layouts included), keyed
        by the stage file (manifest sha256, path, inode, size, mtime), the ORT version, the
        optimization level and this CPU."""
        if self.graph_cache is None or self.providers != ["CPUExecutionProvider"]:
            return None
        if manifest.stage(stage_name).data_file:
            # a graph with ONNX external data (ViT-L's segmenter): ORT's saved optimized graph
            # would point at the data by a path relative to the cache folder, where it is not
            return None
        import hashlib  # noqa: PLC0415
        import platform  # noqa: PLC0415
        cpu = _cpu_flags_line()
        try:  # the file itself (a manifest loaded without verification may not match it)
            st = os.stat(manifest.stage_path(stage_name))
        except OSError:
            return None
        key = hashlib.sha256("|".join([
            manifest.stage(stage_name).sha256, os.path.realpath(manifest.stage_path(stage_name)),
            str(st.st_ino), str(st.st_size), str(st.st_mtime_ns),
            _ort().__version__, str(self._level),
            manifest.precision, manifest.msda, platform.machine(), platform.processor(),
            cpu]).encode()).hexdigest()[:24]
        return os.path.join(self.graph_cache, f"{stage_name}-{key}.ort.onnx")

    def load_stage(self, stage_name: str, manifest) -> None:
        """Create the ORT session of ``stage_name`` (no-op if loaded).

        Raises :class:`BundleError` (stage missing, unreadable ONNX, ``trt-builtin`` bundle) or
        :class:`DependencyError` (plugin bundle without the CPU twin).
        """
        if stage_name in self._sessions:
            return
        spec = manifest.stage(stage_name)
        if manifest.msda == "trt-builtin":
            raise BundleError(f"bundle {manifest.root} was exported with --msda trt-builtin "
                              "(TensorRT's MultiscaleDeformableAttnPlugin_TRT), which ONNX "
                              "Runtime cannot run; re-export with --msda onnx or plugin")
        path = manifest.stage_path(stage_name)
        if not path.is_file():
            raise BundleError(f"{path} (stage '{stage_name}') is missing; re-export the bundle")
        ort = _ort()
        per_frame = any(isinstance(d, str) and d in PER_FRAME_DIMS
                        for t in spec.inputs for d in t.shape)
        so = self._session_options(manifest.msda, per_frame_shapes=per_frame)
        if "CPUExecutionProvider" == self.providers[0] and not self._warned_int8:
            line = int8_saturation_warning(manifest)
            if line:
                import sys  # noqa: PLC0415
                print(line, file=sys.stderr)
            self._warned_int8 = True
        cached = self._graph_cache_paths(stage_name, manifest)
        hit = cached is not None and os.path.isfile(cached)
        tmp_cache = None
        if hit:
            # already optimized for this machine: load as is (ORT's "offline" mode)
            path = cached
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                os.utime(cached)  # recently used: the size cap evicts the oldest first
            except OSError:
                pass
        elif cached is not None:
            try:
                os.makedirs(self.graph_cache, exist_ok=True)
                from dvis_trt.outputs import temp_path  # recognisable; cleaned if orphaned
                tmp_cache = str(temp_path(cached))
                so.optimized_model_filepath = tmp_cache
            except OSError:
                tmp_cache = None  # an unwritable cache only costs speed
        import time  # noqa: PLC0415
        t0 = time.perf_counter()
        # int8 bundles: ORT's common-subexpression elimination would merge the per-consumer
        # DequantizeLinear copies the quantizer made, and the int8 kernels would not fuse
        # (the DedicatedQDQPair option in dvis_trt.export.quantize)
        disabled = INT8_DISABLED_OPTIMIZERS if manifest.precision == "int8" else None
        try:
            try:
                sess = ort.InferenceSession(str(path), sess_options=so,
                                            providers=self.providers,
                                            disabled_optimizers=disabled)
            except Exception:  # noqa: BLE001 - a cached graph ORT cannot load: drop it
                if not hit:
                    raise
                with contextlib.suppress(OSError):
                    os.unlink(cached)
                hit, path = False, manifest.stage_path(stage_name)
                so = self._session_options(manifest.msda, per_frame_shapes=per_frame)
                from dvis_trt.outputs import temp_path  # noqa: PLC0415
                tmp_cache = str(temp_path(cached))      # written again, as on a miss
                so.optimized_model_filepath = tmp_cache
                sess = ort.InferenceSession(str(path), sess_options=so,
                                            providers=self.providers,
                                            disabled_optimizers=disabled)
        except Exception as exc:  # ORT raises its own exception types
            if tmp_cache and os.path.exists(tmp_cache):
                os.unlink(tmp_cache)
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"ONNX Runtime cannot load {path} (stage '{stage_name}'): {first}"
                              ) from exc
        self.session_seconds[stage_name] = (time.perf_counter() - t0, hit)
        if tmp_cache and os.path.isfile(tmp_cache):
            try:
                os.replace(tmp_cache, cached)
                prune_graph_cache(self.graph_cache, self._cache_max, keep=cached)
            except OSError:
                pass
        got_in = [i.name for i in sess.get_inputs()]
        want_in = [t.name for t in spec.inputs]
        if sorted(got_in) != sorted(want_in):
            raise BundleError(f"{path}: graph inputs {got_in} do not match the manifest's "
                              f"{want_in}; re-export the bundle")
        got_out = [o.name for o in sess.get_outputs()]
        want_out = [t.name for t in spec.outputs]
        if sorted(got_out) != sorted(want_out):
            raise BundleError(f"{path}: graph outputs {got_out} do not match the manifest's "
                              f"{want_out}; re-export the bundle")
        self._sessions[stage_name] = sess
        self._specs[stage_name] = spec
        self._outputs[stage_name] = tuple(want_out)

    @property
    def loaded_stages(self) -> Tuple[str, ...]:
        return tuple(self._sessions)

    @property
    def active_providers(self) -> Dict[str, list]:
        """Providers each loaded session actually uses (stage -> list)."""
        return {k: list(s.get_providers()) for k, s in self._sessions.items()}

    # -- running ---------------------------------------------------------------------------
    def run(self, stage_name: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one stage on host arrays (see :meth:`Backend.run`)."""
        sess = self._sessions.get(stage_name)
        if sess is None:
            raise BundleError(f"stage '{stage_name}' is not loaded in the ONNX Runtime backend; "
                              "call load_stage first")
        spec = self._specs[stage_name]
        check_inputs(spec, inputs)
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        names = self._outputs[stage_name]
        try:
            outs = sess.run(list(names), feed)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            shapes = {k: tuple(v.shape) for k, v in feed.items()}
            raise InputError(f"stage '{stage_name}' failed in ONNX Runtime with inputs {shapes}: "
                             f"{first}") from exc
        return dict(zip(names, outs))

    def close(self) -> None:
        self._sessions.clear()
        self._specs.clear()
        self._outputs.clear()
