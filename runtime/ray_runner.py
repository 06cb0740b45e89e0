"""``dvis-trt run BUNDLE INPUT... --ray [ADDRESS]``: a video collection on a Ray cluster (no torch).

One video is one unit of work (the tracker state and the refiner's whole-clip view stay on one
worker). The driver (this process):

1. turns the inputs into video references — local paths (absolute, so every node of a cluster
   that mounts the same storage finds them), frame folders, a YouTube-VIS json, or URIs that
   pyarrow reads (``s3://bucket/videos/``: the video files in it) — and skips those whose shard
   is already committed (:mod:`~dvis_trt.runtime.shards`, shared with the local run);
2. builds a Ray Dataset of the remaining references, one block per video
   (``ray.data.from_items``), and maps it with a callable-class **actor pool**
   (``map_batches(VideoWorker, compute=ActorPoolStrategy(...), batch_size=1)``): each actor
   loads the bundle once (ONNX Runtime with intra-op threads = its CPUs, or TensorRT;
   ``num_gpus`` per actor when the cluster has GPUs) and runs the unchanged per-video pipeline
   (:meth:`~dvis_trt.runtime.runner.Runner.run_source`);
3. commits each answer as a shard the moment it arrives (only the driver writes shards, so a
   video is never written twice nor half-written), drives one progress bar over the
   collection, and merges ``results.json`` in input order at the end — byte-identical to the
   local run.

Faults: an actor process that dies while it holds a video is restarted by Ray and the video is
retried (``--ray-retries``, default 2; Ray's ``max_task_retries``); a video that kills its
worker more often is reported as failed and the collection goes on. A bad video (unreadable,
0 frames) comes back as a failure and is reported once. A stage error is retried once on the
same actor; if it repeats, the video fails — with ``--keep-going`` the collection goes on, else
the run stops as the local run does (finished shards are kept either way).

The bundle is shipped to the workers once: its files are put in the object store and each node
unpacks them once into a local cache (``--ray-bundle ship``, the default on multi-node clusters),
or the workers read the bundle path itself (``--ray-bundle shared``: a path every node mounts;
the default on a one-node cluster).

Ray is an optional extra (``pip install 'dvis-trt[ray]'``); without it ``--ray`` says so in one
line. The official code has no counterpart (it evaluates in one process).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from dvis_trt.errors import DvisTrtError, InputError

from .ray_inputs import TEST_EXIT_ENV, VideoRef, _import_ray, collect_inputs, split_address
from .ray_worker import VideoWorker, _AttemptRegistry, ship_bundle

__all__ = ["RayOptions", "RayRunSummary", "plan_workers", "run_collection", "shard_key_of_args",
           "run_from_args"]


# --------------------------------------------------------------------------------------------
# resources -> actors
# --------------------------------------------------------------------------------------------
@dataclass
class RayOptions:
    """How the collection maps onto the cluster (``--workers``, ``--ray-cpus-per-worker``,
    ``--ray-gpus-per-worker``, ``--ray-retries``, ``--ray-bundle``); None = derive from the
    cluster's resources (:func:`plan_workers`)."""

    address: str = "auto"
    workers: Optional[int] = None
    cpus_per_worker: Optional[float] = None
    gpus_per_worker: Optional[float] = None
    retries: int = 2
    bundle: str = "auto"  # ship | shared | auto


def plan_workers(opts: RayOptions, cluster: Dict[str, float]) -> Tuple[int, float, float]:
    """(workers, cpus per worker, gpus per worker) from the options and
    ``ray.cluster_resources()``.

    GPU cluster: one GPU per worker, as many workers as GPUs, CPUs split evenly (at most 4 each:
    decoding and the host side). CPU cluster: 4 CPUs per worker (or all, if fewer), as many
    workers as fit. Explicit options win; a plan that does not fit the cluster as it is now
    is kept (an autoscaling cluster may grow) but said by the caller."""
    cpus = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    gpw = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    if opts.workers is not None:
        workers = int(opts.workers)
    elif gpw > 0:
        workers = max(1, int(gpus // gpw))
    else:
        cpw0 = opts.cpus_per_worker or min(4.0, max(1.0, cpus))
        workers = max(1, int(cpus // cpw0))
    if opts.cpus_per_worker is not None:
        cpw = float(opts.cpus_per_worker)
    elif gpw > 0:
        cpw = max(1.0, min(4.0, float(int(cpus // workers)) if workers else 1.0))
    else:
        cpw = max(1.0, min(4.0, float(int(cpus // workers)) if workers else 1.0))
    return workers, cpw, gpw


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
@dataclass
class RayRunSummary:
    """What :func:`run_collection` did: finished indices, failures ``[(index, message)]``,
    resumed count, attempts per index, per-worker totals, the written path, the exit code."""

    total: int
    done: List[int] = field(default_factory=list)
    failures: List[Tuple[int, str]] = field(default_factory=list)
    resumed: int = 0
    attempts: Dict[int, int] = field(default_factory=dict)
    workers: Dict[str, Dict[str, float]] = field(default_factory=dict)
    output: Optional[Path] = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.failures else 0


def _quiet_ray_logs() -> None:
    for name in ("ray", "ray.data", "ray._private", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_ray(ray, address: str) -> bool:
    """Join or start a cluster; returns True when this call started the connection (the
    caller shuts it down). ``auto``: ``RAY_ADDRESS`` if set, else a running local cluster,
    else a new local one; ``local``: always a new local one."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True,
                  configure_logging=True)
    if address == "local":
        ray.init(address="local", **kwargs)
    elif address == "auto":
        ray.init(**kwargs) if not os.environ.get("RAY_ADDRESS") else \
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"cannot join the Ray cluster at '{address}': {exc}") from None
    return True


def run_collection(bundle: str, refs: Sequence[VideoRef], jobs, journal, runner_opts: Dict,
                   discover: Dict, *, strict: bool, opts: RayOptions, keep_going: bool,
                   quiet: bool, threads: Optional[int]) -> RayRunSummary:
    """Run the not-yet-finished ``refs`` on the cluster and commit each answer in ``journal``
    (see the module docstring). Returns a :class:`RayRunSummary`; raises
    :class:`DvisTrtError` for an error that stops the run (a stage error without
    ``keep_going``, a worker that cannot load the bundle, a Ray failure)."""
    ray = _import_ray()
    import ray.data

    total = len(refs)
    summary = RayRunSummary(total=total, resumed=len(journal.resumed))
    pending = [r for r in refs if not journal.done(r.index)]
    if not pending:
        return summary
    say = (lambda line: None) if quiet else (lambda line: print(line, flush=True))
    _quiet_ray_logs()
    started = _init_ray(ray, opts.address)
    t_start = time.perf_counter()
    try:
        cluster = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        workers, cpw, gpw = plan_workers(opts, cluster)
        workers = min(workers, len(pending))
        ort_threads = threads or max(1, int(cpw))
        shared = opts.bundle == "shared" or (opts.bundle == "auto" and len(nodes) <= 1)
        shipped = str(Path(bundle).absolute()) if shared else \
            ship_bundle(ray, Path(bundle).absolute())
        fits = workers * cpw <= cluster.get("CPU", 0) and workers * gpw <= cluster.get("GPU", 0)
        say(f"ray: {len(nodes)} node(s), {cluster.get('CPU', 0):g} CPUs, "
            f"{cluster.get('GPU', 0):g} GPUs -> {workers} worker(s) x ({cpw:g} CPU, "
            f"{gpw:g} GPU, {ort_threads} thread(s)); bundle "
            f"{'read from ' + str(shipped) if shared else 'shipped via the object store'}; "
            f"{len(pending)} video(s) to run"
            + ("" if fits else " (more than the cluster has now: actors start as it grows)"))
        registry = ray.remote(num_cpus=0)(_AttemptRegistry).remote()
        spec = {"bundle": shipped, "runner": dict(runner_opts, threads=ort_threads),
                "cpus": cpw, "discover": discover, "strict": strict, "total": total, "stage_retries": 1,
                "registry": registry, "test_exit_on": os.environ.get(TEST_EXIT_ENV) or None}
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.max_errored_blocks = -1  # a video that kills its worker too often drops alone
        ctx.execution_options.preserve_order = False
        ds = ray.data.from_items([r.row() for r in pending], override_num_blocks=len(pending))
        compute = ray.data.ActorPoolStrategy(size=workers) if fits else \
            ray.data.ActorPoolStrategy(min_size=1, max_size=workers)
        with warnings.catch_warnings():  # max_task_retries has no named parameter yet
            warnings.simplefilter("ignore")
            ds = ds.map_batches(VideoWorker, fn_constructor_args=(spec,), batch_size=1,
                                batch_format="pyarrow", compute=compute, num_cpus=cpw,
                                num_gpus=gpw or None, max_restarts=-1,
                                max_task_retries=int(opts.retries))
        summary = _consume(ds, pending, jobs, journal, summary, keep_going=keep_going,
                           quiet=quiet, say=say, t_start=t_start)
        try:
            summary.attempts, _ = ray.get(registry.snapshot.remote(), timeout=30)
        except Exception:  # pragma: no cover - the registry is best effort
            pass
        by_index = {r.index: r for r in pending}
        seen = set(summary.done) | {i for i, _ in summary.failures}
        for r in pending:  # dropped after --ray-retries worker deaths
            if r.index not in seen:
                n = summary.attempts.get(r.index, opts.retries + 1)
                msg = (f"its Ray worker died {n} time(s) while running it (--ray-retries "
                       f"{opts.retries}); the rest of the collection went on")
                summary.failures.append((r.index, msg))
                print(f"dvis-trt: skipped [{r.index + 1}/{total}] {by_index[r.index].name}: "
                      f"{msg}", file=sys.stderr, flush=True)
        summary.failures.sort()
    finally:
        summary.seconds = time.perf_counter() - t_start
        if started:
            ray.shutdown()
    return summary


def _consume(ds, pending, jobs, journal, summary: RayRunSummary, *, keep_going: bool,
             quiet: bool, say, t_start: float) -> RayRunSummary:
    import ray

    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="video", desc="videos", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
    echo = (lambda line: (bar.write(line) if bar is not None else say(line)))
    total = summary.total
    frames = 0
    got = set()
    rows = iter(ds.iter_rows())
    try:
        for row in rows:
            i = int(row["index"])
            if i in got:  # never commit a video twice
                continue
            got.add(i)
            status = row["status"]
            w = summary.workers.setdefault(row["worker"], {"videos": 0, "failed": 0,
                                                           "frames": 0, "seconds": 0.0})
            if status == "init_error":
                raise DvisTrtError(f"a Ray worker ({row['worker']}) could not load the bundle: "
                                   f"{row['message']}", exit_code=int(row["exit_code"]))
            name = jobs[i].name
            if status == "ok":
                results = json.loads(row["results"])
                journal.commit(i, results, json.loads(row["summary"]), keep=False)
                summary.done.append(i)
                frames += int(row["frames"])
                w["videos"] += 1
                w["frames"] += int(row["frames"])
                w["seconds"] += float(row["seconds"])
                echo(json.loads(row["summary"]).get("line", name))
            else:
                w["failed"] += 1
                if status == "error" and (not keep_going or total == 1):
                    raise DvisTrtError(f"{name}: {row['message']} (finished videos are kept; "
                                       "--keep-going skips failing videos)",
                                       exit_code=int(row["exit_code"]))
                if status == "bad_input" and total == 1:
                    raise InputError(row["message"])
                summary.failures.append((i, row["message"]))
                msg = f"dvis-trt: skipped [{i + 1}/{total}] {name}: {row['message']}"
                if bar is not None:
                    bar.write(msg, file=sys.stderr)
                else:
                    print(msg, file=sys.stderr, flush=True)
            if bar is not None:
                el = time.perf_counter() - t_start
                bar.set_postfix_str(f"done {len(summary.done)}, failed "
                                    f"{len(summary.failures)}, {frames / el:.1f} frames/s",
                                    refresh=False)
                bar.update(1)
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DvisTrtError(f"the Ray job failed: {first}", exit_code=70) from None
    finally:
        close = getattr(rows, "close", None)
        if close is not None:  # stops the streaming execution (its actors) at once on abort
            close()
        if bar is not None:
            bar.close()
    return summary


def shard_key_of_args(args, bundle_root, category_ids) -> str:
    """The shard key of a ``run`` command line: the same as
    :meth:`~dvis_trt.runtime.runner.Runner.shard_key` of the local run with these options, so
    local and Ray runs resume each other."""
    from .shards import key_for_run

    return key_for_run(bundle_root, backend=args.backend, providers=args.providers,
                       window=args.window,
                       clip_frames=None if args.clip_frames == 0 else args.clip_frames,
                       memory_gb=args.memory_gb, category_ids=category_ids,
                       lenient=bool(args.lenient))


def run_from_args(args) -> int:
    """``dvis-trt run ... --ray``: the same checks and outputs as the local run."""
    from .bundle import load_manifest
    from .inputs import check_outputs, load_class_names, overlay_paths
    from .shards import open_journal, video_identity

    _import_ray()
    address, inputs = split_address(args.ray, args.inputs)
    strict = not args.lenient
    jobs, refs, category_ids, discover = collect_inputs(inputs, args.ytvis_json,
                                                        args.ytvis_root, strict)
    manifest = load_manifest(args.bundle, verify=not args.no_verify)
    names = load_class_names(args.class_names, manifest.config.num_classes,
                             manifest.config.class_names)
    overlays = overlay_paths(args.overlay, jobs)
    from .cli_run import read_paths  # the output-safety rule: same reads as the local run

    check_outputs(jobs, args.output, overlays, reads=read_paths(args))
    for i, p in overlays.items():
        refs[i].overlay = str(Path(p).absolute())
    if category_ids is not None and len(category_ids) != manifest.config.num_classes:
        category_ids = None  # as Runner does (it warns once, on each worker)
    clip_frames = None if args.clip_frames == 0 else args.clip_frames
    runner_opts = dict(backend=args.backend, window=args.window, clip_frames=clip_frames,
                       memory_gb=args.memory_gb, class_names=names, category_ids=category_ids,
                       overlay_min_score=args.overlay_min_score, providers=args.providers,
                       checkpoint=args.checkpoint and str(Path(args.checkpoint).absolute()),
                       config_file=args.config_file and str(Path(args.config_file).absolute()),
                       verify=not args.no_verify)
    key = shard_key_of_args(args, manifest.root, category_ids)
    idents = [video_identity(r.name, r.video_id, r.uri or (jobs[r.index].path or None))
              for r in refs]
    say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    opts = RayOptions(address=address, workers=args.workers,
                      cpus_per_worker=args.ray_cpus_per_worker,
                      gpus_per_worker=args.ray_gpus_per_worker, retries=args.ray_retries,
                      bundle=args.ray_bundle)
    with open_journal(args.output, key, idents, args.resume, say) as journal:
        summary = run_collection(str(manifest.root), refs, jobs, journal, runner_opts, discover,
                                 strict=strict, opts=opts, keep_going=args.keep_going,
                                 quiet=args.quiet, threads=args.threads)
        total = len(refs)
        if not journal.finished:
            raise InputError(f"none of the {total} videos could be processed (see the lines "
                             "above); nothing was written")
        written = journal.write(args.output, None)
    frames = sum(w["frames"] for w in summary.workers.values())
    tail = f"; {len(summary.failures)} of {total} videos skipped" if summary.failures else ""
    if summary.resumed:
        tail += f"; {summary.resumed} finished earlier (resumed)"
    where = f" -> {written}" if written is not None else ""
    say(f"{len(summary.done)} video(s), {frames} frames in {summary.seconds:.1f} s on Ray "
        f"({frames / summary.seconds if summary.seconds > 0 else 0:.1f} frames/s, "
        f"{len(summary.done) * 60 / summary.seconds if summary.seconds > 0 else 0:.1f} "
        f"videos/min){where}{tail}")
    retried = {i: n for i, n in summary.attempts.items() if n > 1}
    if retried:
        say("retried after a worker died: " + ", ".join(
            f"{refs[i].name} ({n} attempts)" for i, n in sorted(retried.items())))
    for w, s in sorted(summary.workers.items()):
        say(f"worker {w}: {int(s['videos'])} video(s), {int(s['failed'])} failed, "
            f"{int(s['frames'])} frames, {s['seconds']:.1f} s busy"
            + (f" ({s['frames'] / s['seconds']:.1f} frames/s)" if s["seconds"] > 0 else ""))
    if summary.failures:
        print(f"dvis-trt: {len(summary.failures)} of {total} videos were skipped: "
              + ", ".join(refs[i].name for i, _ in summary.failures), file=sys.stderr,
              flush=True)
    return summary.exit_code
