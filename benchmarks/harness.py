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
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from dvis_trt.errors import InputError

from dvis_trt.runtime.bundle import load_constants

from .parity import FP32_PARITY, LOWP_BACKENDS, LOWP_PARITY, Instances, compare_instances
from .runners import (BACKENDS, ENGINE_STAGES, SCHEMA, STAGE_GROUPS, BackendUnavailable,
                      EagerRunner, PipelineRunner, RunOutput, alternate, decode_video,
                      make_pipeline_runner)
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
    from dvis_trt.runtime.bundle import load_manifest
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
    from dvis_trt.runtime.bundle import load_manifest
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
            from dvis_trt.runtime.backends.registry import create_backend
            stage_backends["torch"] = create_backend("torch", recorder_manifest, model=model,
                                                     threads=threads)
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
