"""A video collection: local sequential run vs ``dvis-trt run --ray`` with 1 and 2 workers.

    python benchmarks/ray_scaling.py --bundle BUNDLE [--videos 8] [--frames 16] [--size 240x320]
        [--rounds 3] [--cpus 2] [--json ray_scaling.json]

Renders ``--videos`` short demo MP4s (:func:`~dvis_trt.runtime.synthetic.make_demo_video`,
one seed each), starts one local Ray cluster (``--cpus`` CPUs, no dashboard) and then, in
every round, runs the whole collection three ways, in a rotating order so drift on a shared
machine spreads over all of them:

* ``local``: ``dvis-trt run BUNDLE v0.mp4 ... --threads 1`` (one process, the bundle loaded
  once, videos one after the other);
* ``ray-1`` / ``ray-2``: the same with ``--ray --workers 1|2 --ray-cpus-per-worker 1
  --threads 1`` on the already-running cluster (each run starts its actors and loads the
  bundle in them: that start-up is part of the cost a user pays per run).

Each run writes a fresh results file (``--no-resume``); every run's file must equal the first
local run's byte for byte, or the script stops. Reported per mode: wall seconds per collection
(median, min-max over rounds), videos/min, the speed-up over local, and the overhead Ray adds
per video with one worker, ``(wall(ray-1) - wall(local)) / videos`` (actor start-up and bundle
load amortised over the collection, plus per-video scheduling and result transfer), split into
a fixed start-up per run and a steady per-video cost by also timing one-video runs of
``local`` and ``ray-1`` (overhead = fixed + per_video x videos).

Not a test: timings on a shared machine are noisy; the spread is printed with the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List


def _size(text: str):
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=_size, default=(240, 320), metavar="HxW")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray

    from dvis_trt.runtime.cli import main as cli
    from dvis_trt.runtime.synthetic import make_demo_video

    work = Path(tempfile.mkdtemp(prefix="dvis-trt-ray-bench."))
    videos = []
    for i in range(args.videos):
        p = work / f"v{i}.mp4"
        make_demo_video(p, num_frames=args.frames, size=args.size, seed=100 + i)
        videos.append(str(p))
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    common = ["run", args.bundle, *videos, "--threads", "1", "--quiet", "--no-resume",
              "--backend", "ort", "--providers", "cpu"]
    n_all = len(videos)
    modes = {
        "local": [],
        "ray-1": ["--ray", "--workers", "1", "--ray-cpus-per-worker", "1"],
        "ray-2": ["--ray", "--workers", "2", "--ray-cpus-per-worker", "1"],
    }
    names = list(modes)
    # one-video runs of local and ray-1 separate Ray's fixed start-up from its per-video cost
    runs = names + ["local@1", "ray-1@1"]
    walls: Dict[str, List[float]] = {m: [] for m in runs}
    reference: Dict[int, bytes] = {}
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for m in order:
            mode, _, one = m.partition("@")
            out = work / f"{mode}-{r}-{one or n_all}.json"
            argv = [*common, "-o", str(out), *modes[mode]]
            if one:
                argv = [a for a in argv if a not in videos[1:]]
            t0 = time.perf_counter()
            rc = cli(argv)
            wall = time.perf_counter() - t0
            if rc != 0:
                print(f"{m}: exit code {rc}", file=sys.stderr)
                return rc
            data = out.read_bytes()
            size = 1 if one else n_all
            if reference.setdefault(size, data) != data:
                print(f"{m} round {r}: results differ from the first run", file=sys.stderr)
                return 1
            walls[m].append(wall)
            print(f"round {r + 1}/{args.rounds} {m:8s} {wall:6.2f} s", flush=True)
    ray.shutdown()

    n = args.videos
    med = {m: statistics.median(v) for m, v in walls.items()}
    rows = []
    for m in names:
        rows.append({"mode": m, "wall_s_median": med[m], "wall_s_min": min(walls[m]),
                     "wall_s_max": max(walls[m]), "videos_per_min": n * 60 / med[m],
                     "speedup_vs_local": med["local"] / med[m], "walls": walls[m]})
    overhead = (med["ray-1"] - med["local"]) / n
    spread = [(a - b) / n for a, b in zip(walls["ray-1"], walls["local"])]
    # overhead(n) = fixed + per_video * n, from n = 1 and n = videos
    ov_n = med["ray-1"] - med["local"]
    ov_1 = statistics.median(walls["ray-1@1"]) - statistics.median(walls["local@1"])
    per_video = (ov_n - ov_1) / (n - 1) if n > 1 else float("nan")
    fixed = ov_1 - per_video
    print()
    print(f"{n} videos x {args.frames} frames {args.size[0]}x{args.size[1]}, "
          f"{args.rounds} rounds, 1 ONNX Runtime thread per worker, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), Ray cluster of {args.cpus} CPUs")
    print("| mode | s per collection, median (min-max) | videos/min | vs local |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['wall_s_median']:.2f} ({row['wall_s_min']:.2f}-"
              f"{row['wall_s_max']:.2f}) | {row['videos_per_min']:.1f} | "
              f"{row['speedup_vs_local']:.2f}x |")
    print(f"Ray overhead per video (1 worker): {overhead:.2f} s median "
          f"(rounds: {', '.join(f'{s:.2f}' for s in spread)}) = fixed start-up "
          f"{fixed:.2f} s per run (actors + bundle load) + {per_video:.3f} s per video "
          f"(scheduling, result transfer, shard commit)")
    print(f"one video: local {statistics.median(walls['local@1']):.2f} s, ray-1 "
          f"{statistics.median(walls['ray-1@1']):.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"videos": n, "frames": args.frames, "size": list(args.size),
             "rounds": args.rounds, "cpus": args.cpus, "rows": rows,
             "ray_overhead_s_per_video": overhead, "overhead_per_round": spread,
             "ray_fixed_startup_s": fixed, "ray_overhead_s_per_video_steady": per_video,
             "one_video_walls": {"local": walls["local@1"], "ray-1": walls["ray-1@1"]}},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
