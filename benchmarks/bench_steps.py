"""The steps of :func:`dvis_trt.benchmarks.harness.run_bench`, in order, and what they share.

Each step reads what it needs from a :class:`BenchRun` and sets what it makes on it; the
options are :class:`BenchOptions`. The eager baseline model and the isolated memory probe live
here too.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping

import numpy as np

from dvis_trt.errors import InputError

from dvis_trt.runtime.bundle import load_manifest
from dvis_trt.runtime.extras import have, missing_message
from dvis_trt.runtime.preprocess import ResizeGeometry

from .bench_options import BenchOptions, _row_key, build_eager_model, bundle_tags
from .parity import (LOWP_BACKENDS, LOWP_PARITY, LOWP_PRECISIONS, accuracy_parity,
                     compare_instances)
from .runners import (BACKENDS, ENGINE_STAGES, SCHEMA, STAGE_GROUPS, BackendUnavailable,
                      EagerRunner, PipelineRunner, RunOutput, alternate, decode_video,
                      make_pipeline_runner)
from .stages import (bench_stages, capture_stage_inputs, profile_ort_stage,
                     profile_torch_stage)
from .system import (MemorySampler, available_cpus, gemm_rate, pin_threads, ratio_summary,
                     summarize, system_info)

def _memory_probe(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Run one backend once in a fresh process; returns its peak RSS (sampled every 10 ms) and
    the RSS after loading (model / sessions) but before the run."""
    code = ("import json,sys; from dvis_trt.benchmarks.bench_steps import _memory_probe_main; "
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


def check_options(state: "BenchRun") -> None:
    """Refuse unknown backends and bad options before any work."""
    opts = state.opts
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
    if opts.no_baseline and "torch" in opts.backends:
        raise InputError("--no-baseline leaves out the eager model, which the torch row is: "
                         "drop torch from --backends or --no-baseline")
    state.log = log


def pin_and_load(state: "BenchRun") -> None:
    """Pin the thread pools, read the bundles' manifests."""
    log, opts = state.log, state.opts
    started = _dt.datetime.now(_dt.timezone.utc)
    has_torch = have("torch")  # an edge install benches ONNX Runtime rows without torch
    if has_torch:
        import torch  # noqa: F401 - imported before pinning so torch's pools get the count
    threads = int(opts.threads or available_cpus())
    pinned = pin_threads(threads, opts.affinity)
    manifests = [load_manifest(b, verify=False) for b in opts.bundles]
    # rows are keyed by (msda, precision), plus the folder name where two bundles share both
    tags = bundle_tags(manifests)
    primary = manifests[0]
    multi = len(manifests) > 1
    log(f"threads: {threads} (torch {pinned.get('torch_threads')}, ORT intra-op {threads}); "
        f"bundle {primary.root} (msda={primary.msda})")
    state.has_torch = has_torch
    state.manifests = manifests
    state.tags = tags
    state.multi = multi
    state.pinned = pinned
    state.primary = primary
    state.started = started
    state.threads = threads


def decode_video_once(state: "BenchRun") -> None:
    """Decode the video once (every backend gets the same frames); the resize geometry."""
    log, opts, primary = state.log, state.opts, state.primary
    frames, decode_s = decode_video(opts.video, opts.max_frames)
    h0, w0 = frames[0].shape[:2]
    cfg = primary.config
    geometry = ResizeGeometry.of(h0, w0, cfg)   # the one resize rule of the runtime
    (hr, wr), (hp, wp) = geometry.resized, geometry.padded
    log(f"video {opts.video}: {len(frames)} frames of {h0}x{w0} -> {hr}x{wr} "
        f"(padded {hp}x{wp}); decode {decode_s:.2f} s")
    state.cfg = cfg
    state.frames = frames
    state.h0 = h0
    state.hp = hp
    state.hr = hr
    state.w0 = w0
    state.wp = wp
    state.wr = wr


def eager_baseline(state: "BenchRun") -> None:
    """The eager model: the parity reference (and the ``torch`` row) when torch and weights are here."""
    has_torch, log, opts, primary = state.has_torch, state.log, state.opts, state.primary
    # the eager model is built whatever --backends says: it is the parity reference
    if opts.no_baseline:
        model = None
        log("--no-baseline: no eager reference, fp32 rows' parity unchecked")
    elif has_torch:
        model = build_eager_model(primary, opts)
        if model is None:
            log("no --checkpoint / --test-weights and the manifest records no readable "
                "checkpoint: no eager baseline, parity unchecked")
    else:
        model = None
        log(f"no eager baseline, parity unchecked: {missing_message('torch', 'bench', ' for it')}")
    state.model = model


def build_runners(state: "BenchRun") -> None:
    """One runner per (backend, bundle) row; unavailable backends become ``skipped`` rows."""
    has_torch = state.has_torch
    log = state.log
    manifests = state.manifests
    model = state.model
    multi = state.multi
    opts = state.opts
    threads = state.threads
    rows: Dict[str, Dict[str, Any]] = {}
    runners: Dict[str, Any] = {}
    for b in opts.backends:
        for mi, man in enumerate(manifests):
            if b == "torch" and mi > 0:
                continue
            key = _row_key(b, man.msda, multi, "fp32" if b.startswith("torch") else
                           man.precision, "" if b == "torch" else state.tags[str(man.root)])
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
    state.baseline = baseline
    state.rows = rows
    state.runners = runners


def warm_up_and_capture(state: "BenchRun") -> None:
    """The untimed runs: the reference, each row's parity output, the first engine row's stage inputs."""
    baseline = state.baseline
    frames = state.frames
    log = state.log
    opts = state.opts
    rows = state.rows
    runners = state.runners
    recorder_manifest = None
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
    state.outputs = outputs
    state.recorder = recorder
    state.recorder_manifest = recorder_manifest
    state.ref_out = ref_out


def parity(state: "BenchRun") -> None:
    """Each row's instances against the eager baseline's (a mismatch makes the row invalid)."""
    log, opts, outputs, ref_out, rows = state.log, state.opts, state.outputs, state.ref_out, state.rows
    multi = state.multi
    for key, out in outputs.items():
        row = rows[key]
        if row.get("precision") in LOWP_PRECISIONS:
            # a reduced-precision bundle is judged against its fp32 twin in this run (the
            # accuracy report), else against the eager baseline
            twin = _row_key(row["backend"], row["msda"], multi)
            ref = outputs[twin] if twin in outputs and twin != key else ref_out
            if ref is not None:
                row["parity"] = accuracy_parity(ref.instances, out.instances)
                row["parity"]["against"] = twin if ref is not ref_out else "torch"
                row["valid"] = bool(row["parity"]["ok"])
                log(f"{key}: accuracy vs {row['parity']['against']}: "
                    f"{row['parity']['accuracy']['verdict']}")
                continue
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


def timed_rounds(state: "BenchRun") -> None:
    """``repeats`` alternated rounds of decode + run per valid row, memory sampled in process."""
    log, opts, rows, runners, threads = state.log, state.opts, state.rows, state.runners, state.threads
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

    # reduced-precision rows are timed whatever their accuracy verdict (a trade-off the report
    # states, not a wrong graph); other rows only when they match the baseline
    timed = [k for k in runners if rows[k].get("valid") is not False
             or rows[k].get("precision") in LOWP_PRECISIONS]
    for k in runners:
        if k not in timed:
            rows[k]["timing"] = "not reported: output differs from the eager baseline"
    if timed:
        log(f"timed rounds: {opts.repeats} x {', '.join(timed)} (alternating order)")
        walls = alternate({k: one(k) for k in timed}, opts.repeats,
                          on_run=lambda n, r, s: log(f"  round {r + 1} {n}: {s:.2f} s"))
    else:
        walls = {}
    state.mems = mems
    state.samples = samples
    state.timed = timed
    state.walls = walls


def summarize_rows(state: "BenchRun") -> None:
    """Per-row statistics of the rounds and the per-round speedups over torch."""
    frames = state.frames
    mems = state.mems
    rows = state.rows
    samples = state.samples
    timed = state.timed
    walls = state.walls
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
    # a reduced-precision bundle against its fp32 twin (same backend and MSDA mode)
    multi = state.multi
    for k in timed:
        prec = rows[k].get("precision")
        twin = _row_key(rows[k]["backend"], rows[k]["msda"], multi)
        if prec in LOWP_PRECISIONS and twin in walls and twin != k:
            ratios[f"{k} vs {twin}"] = {
                "metric": f"speedup = {twin} wall / row wall, per round",
                **ratio_summary([a / b for a, b in zip(walls[twin], walls[k])]),
                "of_fastest": min(walls[twin]) / min(walls[k])}
    state.nf = nf
    state.ratios = ratios


def isolated_memory(state: "BenchRun") -> None:
    """``--memory isolated``: one run per row in a fresh process for honest peaks."""
    log, opts, rows, threads, timed = state.log, state.opts, state.rows, state.threads, state.timed
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


def stage_microbench(state: "BenchRun") -> None:
    """Every stage on the captured inputs, backends alternated per iteration."""
    log = state.log
    model = state.model
    opts = state.opts
    recorder = state.recorder
    recorder_manifest = state.recorder_manifest
    runners = state.runners
    threads = state.threads
    timed = state.timed
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
    state.stage_res = stage_res


def op_profile(state: "BenchRun") -> None:
    """``--profile-ops``: where one stage's time goes by op type, per backend."""
    log = state.log
    manifests = state.manifests
    model = state.model
    opts = state.opts
    recorder = state.recorder
    rows = state.rows
    runners = state.runners
    threads = state.threads
    timed = state.timed
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
    state.op_profile = op_profile


def gemm_and_flops(state: "BenchRun") -> None:
    """The sustained-GEMM probe and the FLOPs of the ONNX graphs at the run's shapes."""
    log = state.log
    manifests = state.manifests
    nf = state.nf
    opts = state.opts
    recorder = state.recorder
    recorder_manifest = state.recorder_manifest
    rows = state.rows
    stage_res = state.stage_res
    threads = state.threads
    timed = state.timed
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
    state.flops_res = flops_res
    state.gemm = gemm


def record(state: "BenchRun") -> None:
    """The JSON-able record (schema in docs/benchmarks.md)."""
    cfg = state.cfg
    flops_res = state.flops_res
    gemm = state.gemm
    h0 = state.h0
    hp = state.hp
    hr = state.hr
    manifests = state.manifests
    nf = state.nf
    op_profile = state.op_profile
    opts = state.opts
    pinned = state.pinned
    ratios = state.ratios
    rows = state.rows
    stage_res = state.stage_res
    started = state.started
    w0 = state.w0
    wp = state.wp
    wr = state.wr
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
                        if opts.test_weights is not None else
                        "none: --no-baseline" if opts.no_baseline else None),
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
    state.record = record


def sweep(state: "BenchRun") -> None:
    """``--sweep``: frame-count and resolution sweeps of the timed rows."""
    h0 = state.h0
    log = state.log
    opts = state.opts
    record = state.record
    runners = state.runners
    timed = state.timed
    w0 = state.w0
    if opts.sweep:
        from .sweep import run_sweep
        sweep_names = list(opts.sweep_backends or [k for k in timed])
        sweep_runners = {k: runners[k] for k in sweep_names if k in runners}
        record["sweep"] = run_sweep(sweep_runners, frame_counts=opts.sweep_frames,
                                    sizes=opts.sweep_sizes, base_size=(h0, w0),
                                    repeats=opts.sweep_repeats, log=log)


def close_runners(state: "BenchRun") -> None:
    """Close every runner; the load average at the end."""
    record, runners = state.record, state.runners
    record["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") \
        else None
    for r in runners.values():
        r.close()
    return record


class BenchRun:
    """What the steps of :func:`run_bench` hand each other (one attribute per result)."""

    def __init__(self, opts: "BenchOptions"):
        self.opts = opts
        self.record: Dict[str, Any] = {}
