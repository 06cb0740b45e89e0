"""Build one TensorRT engine per stage of a bundle (``dvis-trt build BUNDLE``).

Polygraphy's loaders do the TensorRT work: our MSDA plugin library registered through ``dvis_trt.plugins.register_trt_plugin`` (loaded
before parsing so the ONNX parser finds its creator), ``NetworkFromOnnxPath(strongly_typed=True)``
(TensorRT 11 always builds strongly typed; TRT 10 needs the flag: precision is what the graph's
dtypes say, see :mod:`dvis_trt.export.precision`), ``CreateConfig(profiles=..., memory_pool_limits=
..., load_timing_cache=...)`` (no precision flags: they are gone in TRT 11 and meaningless for a
strongly typed network), ``EngineFromNetwork(..., save_timing_cache=...)`` and ``SaveEngine``.

Layout written (atomically: a temp folder renamed into place once every engine and the engine
manifest are complete, so an interrupted build never leaves a half folder that looks usable)::

    BUNDLE/engines/timing-<gpu>-sm<cc>-trt<ver>.cache        # reused by every later build
    BUNDLE/engines/<gpu>-sm<cc>-trt<ver>-<precision>/
        segmenter.engine ... mask_head.engine  engines.json

``tensorrt`` is imported lazily (inside functions), so ``--help`` and the CPU tests work without
it. Building from an ``--msda onnx`` bundle is refused unless ``allow_gridsample``: GridSample-
based deformable attention is known to build into silently wrong engines on recent TensorRT.
"""
from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

from dvis_trt.errors import BundleError, DependencyError, InputError
from dvis_trt.fileio import sha256_file
from dvis_trt.runtime.bundle import BundleManifest, load_manifest
from dvis_trt.runtime.bundle.engines import (ENGINE_MANIFEST_NAME, ENGINES_DIR, EngineManifest,
                                             MachineInfo, StageEngine, engine_dir_name, gpu_slug,
                                             load_engine_manifest, staleness_reasons,
                                             write_engine_manifest)
from dvis_trt.runtime.bundle.profiles import Profile
from dvis_trt.runtime.backends.trt.loader import machine_info

from .profiles import BuildLimits, derive_profiles

__all__ = ["machine_info", "build_engines", "refuse_gridsample", "default_plugin_library",
           "polygraphy_profiles", "timing_cache_path", "check_engines", "TOLERANCES"]

#: Per-precision tolerances for comparing a TRT engine with ONNX Runtime (fp32 reference).
#: fp32: TF32 is off by default and kernels differ only in summation order -> ~1e-4 relative
#: after a deep net; fp16 has a 2^-11 mantissa (errors ~1e-3 per op, growing with depth);
#: bf16 has 2^-8 (~4e-3 per op).
TOLERANCES = {"fp32": {"rtol": 1e-3, "atol": 1e-3},
              "fp16": {"rtol": 2e-2, "atol": 2e-2},
              "bf16": {"rtol": 5e-2, "atol": 5e-2},
              # int8: both sides run the same Q/DQ graph (explicit quantization), but a value
              # on a rounding boundary moves by one step (1/127 of the tensor's range) and
              # TensorRT fuses the requantization differently from ONNX Runtime
              "int8": {"rtol": 1e-1, "atol": 1e-1}}


def _trt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise DependencyError("`dvis-trt build` needs TensorRT's Python package (pip install "
                              "tensorrt, or JetPack on Jetson) and a GPU") from None
    return trt


def _polygraphy_trt():
    try:
        from polygraphy.backend import trt as ptrt  # noqa: PLC0415
    except ImportError:
        raise DependencyError("`dvis-trt build` needs Polygraphy; pip install "
                              "'dvis-trt[engine]'") from None
    return ptrt


def refuse_gridsample(manifest: BundleManifest, allow: bool) -> None:
    """Raise :class:`BundleError` for an ``--msda onnx`` bundle unless ``allow``."""
    if manifest.msda == "onnx" and not allow:
        raise BundleError(
            f"bundle {manifest.root} was exported with --msda onnx (GridSample deformable "
            "attention), which recent TensorRT is known to build into silently wrong engines; "
            "re-export with --msda plugin (or trt-builtin), or pass --allow-gridsample and "
            "verify with `dvis-trt check --backend trt`")


def default_plugin_library() -> Path | None:
    """Our TensorRT plugin library as built by ``dvis-trt build-plugins``, if it can be found:
    ``$DVIS_TRT_PLUGIN_LIB``, else ``dvis_trt.plugins.find_library("trt")``."""
    env = os.environ.get("DVIS_TRT_PLUGIN_LIB")
    if env:
        return Path(env)
    try:
        from dvis_trt import plugins  # noqa: PLC0415
    except ImportError:
        return None
    find = getattr(plugins, "find_library", None)
    return find("trt") if find is not None else None


def polygraphy_profiles(profiles: Sequence[Profile]):
    """Our :class:`Profile` list -> Polygraphy ``Profile`` objects (``add(name, min, opt,
    max)`` per input)."""
    ptrt = _polygraphy_trt()
    out = []
    for p in profiles:
        pp = ptrt.Profile()
        for name, (lo, opt, hi) in p.shapes.items():
            pp.add(name, min=list(lo), opt=list(opt), max=list(hi))
        out.append(pp)
    return out


def timing_cache_path(bundle_root: Path, machine: MachineInfo) -> Path:
    """``BUNDLE/engines/timing-<gpu>-sm<cc>-trt<ver>.cache`` (shared by all precisions: the
    cache is keyed by layer and tactic, so one file serves every build on this GPU+TRT)."""
    return (bundle_root / ENGINES_DIR /
            f"timing-{gpu_slug(machine.gpu_name)}-sm{machine.sm}-trt{machine.trt_version}.cache")


def build_engines(bundle_dir: str | os.PathLike, limits: BuildLimits, *,
                  workspace_gib: float | None = None, plugin_library: str | None = None,
                  allow_gridsample: bool = False, stages: Iterable[str] | None = None,
                  force: bool = False, optimization_level: int | None = None,
                  device: int = 0, log: Callable[[str], None] = print) -> Path:
    """Build every stage's engine for this GPU; return the engine folder.

    Skips the build when a fresh engine folder with the same limits exists (unless ``force``).
    Raises :class:`BundleError` (bad/stale bundle, ``--msda onnx`` without
    ``allow_gridsample``), :class:`DependencyError` (no TensorRT/GPU/plugin library),
    :class:`InputError` (bad limits).
    """
    manifest = load_manifest(bundle_dir)
    refuse_gridsample(manifest, allow_gridsample)
    stage_names = list(stages) if stages else list(manifest.stages)
    for s in stage_names:
        manifest.stage(s)
    profiles = derive_profiles(manifest, limits, stage_names)

    plugin: Path | None = None
    if manifest.msda == "plugin":
        plugin = Path(plugin_library) if plugin_library else default_plugin_library()
        if plugin is None or not plugin.is_file():
            raise DependencyError(
                f"bundle uses --msda plugin but the TensorRT plugin library "
                f"{plugin or '(not found)'} does not exist; run `dvis-trt build-plugins` or "
                "pass --plugin-lib PATH")
    from dvis_trt.outputs import check_outputs, clean_stale_temps, temp_path
    # the output-safety rule: the engine folders may be replaced, so nothing we read may be
    # in them (the plugin library) and no stage file may be one of them
    check_outputs([("the engines folder", manifest.root / ENGINES_DIR)],
                  [("--plugin-lib", plugin), *((f"stage '{s}'", manifest.stage_path(s))
                                                for s in stage_names)],
                  folders=("the engines folder",))
    trt = _trt()
    ptrt = _polygraphy_trt()
    machine = machine_info(device)
    root = manifest.root
    final = root / ENGINES_DIR / engine_dir_name(machine, manifest.precision)
    if (final.exists() or final.is_symlink()) and \
            not (final.is_dir() and (final / ENGINE_MANIFEST_NAME).is_file()):
        raise InputError(f"{final} exists and is not an engine folder of ours (no "
                         f"{ENGINE_MANIFEST_NAME}); move it away (nothing was changed)")
    plugin_sha = sha256_file(plugin) if plugin else None
    if final.is_dir() and not force:
        try:
            em = load_engine_manifest(final)
            if not staleness_reasons(em, manifest, machine, plugin_sha) \
                    and em.limits == limits.to_dict() and set(stage_names) <= set(em.stages):
                log(f"engines in {final} are up to date (use --force to rebuild)")
                return final
        except BundleError:
            pass
    (root / ENGINES_DIR).mkdir(exist_ok=True)
    clean_stale_temps(root / ENGINES_DIR)   # folders of killed builds
    tmp = temp_path(final, keep_suffix=False)
    tmp.mkdir()
    cache = timing_cache_path(root, machine)
    try:
        trt.init_libnvinfer_plugins(trt.Logger(trt.Logger.WARNING), "")
        stage_engines = {}
        for name in stage_names:
            onnx_path = manifest.stage_path(name)
            log(f"building {name} ({len(profiles[name])} profile(s)) from {onnx_path.name} ...")
            if plugin is not None:
                # our library registers its creators through the registry's load_library
                # (getCreators entry point), not on a plain dlopen: register before parsing
                from dvis_trt.plugins import register_trt_plugin
                register_trt_plugin(plugin)
            network = ptrt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
            pool = {}
            if workspace_gib:
                pool[trt.MemoryPoolType.WORKSPACE] = int(workspace_gib * (1 << 30))
            config = ptrt.CreateConfig(
                profiles=polygraphy_profiles(profiles[name]),
                memory_pool_limits=pool or None,
                load_timing_cache=str(cache) if cache.is_file() else None,
                builder_optimization_level=optimization_level)
            engine_path = tmp / f"{name}.engine"
            build = ptrt.EngineFromNetwork(network, config, save_timing_cache=str(cache))
            engine = ptrt.SaveEngine(build, str(engine_path))()
            if engine.num_optimization_profiles != len(profiles[name]):
                raise BundleError(f"'{name}' engine has {engine.num_optimization_profiles} "
                                  f"profiles, expected {len(profiles[name])}")
            stage_engines[name] = StageEngine(engine_path.name, sha256_file(engine_path),
                                              manifest.stages[name].sha256,
                                              tuple(profiles[name]))
            del engine
        from dvis_trt import __version__  # noqa: PLC0415
        em = EngineManifest(
            tensorrt_version=machine.trt_version, gpu_name=machine.gpu_name,
            compute_capability=machine.compute_capability, precision=manifest.precision,
            msda=manifest.msda, stages=stage_engines,
            plugin_library=({"name": plugin.name, "path": str(plugin.resolve()),
                             "sha256": plugin_sha} if plugin else None),
            limits=limits.to_dict(),
            builder={"dvis_trt": __version__, "workspace_gib": workspace_gib,
                     "optimization_level": optimization_level, "timing_cache": cache.name,
                     "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds")})
        write_engine_manifest(tmp, em)
        old = None
        if final.exists():
            old = temp_path(final.with_name(final.name + ".old"), keep_suffix=False)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"engines written to {final}")
    return final


def check_engines(bundle_dir: str | os.PathLike, *, engine_dir: str | None = None,
                  stages: Iterable[str] | None = None, inputs: dict | None = None,
                  seed: int = 0, log: Callable[[str], None] = print) -> bool:
    """Compare every stage's engine with ONNX Runtime on the same inputs using Polygraphy's
    ``Comparator`` (``TrtRunner`` vs ``OnnxrtRunner``; tolerances per precision from
    :data:`TOLERANCES`). ``inputs``: stage -> {name: array}; default: random inputs at each
    stage's first profile's opt shape (``slot_index`` drawn in range). Returns True when all
    stages match. Needs TensorRT and a GPU; ORT runs on CPU (the plugin bundle needs our ORT
    custom-op library, registered by the ORT backend's session options).
    """
    import numpy as np  # noqa: PLC0415
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx  # noqa: PLC0415
    from polygraphy.comparator import Comparator, CompareFunc  # noqa: PLC0415
    ptrt = _polygraphy_trt()
    manifest = load_manifest(bundle_dir)
    machine = machine_info()
    from dvis_trt.runtime.bundle.engines import check_fresh, find_engine_dir  # noqa: PLC0415
    edir = Path(engine_dir) if engine_dir else find_engine_dir(manifest, machine)
    em = load_engine_manifest(edir)
    plugin_sha = None
    if em.plugin_library:
        plugin_sha = sha256_file(em.plugin_library["path"]) \
            if Path(em.plugin_library["path"]).is_file() else None
    check_fresh(em, manifest, machine, plugin_sha)
    tol = TOLERANCES[manifest.precision]
    rng = np.random.default_rng(seed)
    ok_all = True
    for name in (stages or em.stages):
        spec = manifest.stage(name)
        prof = em.stages[name].profiles[0]
        feed = (inputs or {}).get(name)
        if feed is None:
            feed = {}
            for t in spec.inputs:
                shape = prof.shapes[t.name][1]
                if t.dtype == "int64":
                    hi = manifest.config.num_queries
                    feed[t.name] = rng.integers(0, hi, size=shape, dtype=np.int64)
                else:
                    feed[t.name] = rng.standard_normal(shape).astype(t.dtype)
        if em.plugin_library:
            from dvis_trt.plugins import register_trt_plugin
            register_trt_plugin(em.plugin_library["path"])  # before deserialising
        engine = ptrt.EngineFromPath(str(edir / em.stages[name].file))
        runners = [OnnxrtRunner(SessionFromOnnx(str(manifest.stage_path(name)))),
                   ptrt.TrtRunner(engine)]
        results = Comparator.run(runners, data_loader=[feed])
        ok = bool(Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(rtol=tol["rtol"], atol=tol["atol"])))
        log(f"{name}: {'OK' if ok else 'MISMATCH'} (rtol={tol['rtol']}, atol={tol['atol']})")
        ok_all &= ok
    return ok_all
