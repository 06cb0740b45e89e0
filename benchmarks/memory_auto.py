"""Peak memory (RSS) of ``dvis-trt run --clip-frames auto`` against video length: flat by design.

    python benchmarks/memory_auto.py --bundle tiny=BUNDLE_DIR [--bundle r50=BUNDLE_DIR ...]
        [--make-r50-bundle DIR] [--lengths 16,250,1000,2000] [--size 64x96]
        [--memory-gb tiny=0.25,r50=1.5] [--threads 2] [--work-dir DIR] [--json memory_auto.json]
    python benchmarks/memory_auto.py --table A.json B.json ...   (one table of several runs)

For each bundle and each length it renders one H.264 video of the same synthetic scene
(:func:`dvis_trt.runtime.synthetic.make_demo_video`) and runs ``dvis-trt run BUNDLE VIDEO
--clip-frames auto --memory-gb G`` in a fresh Python process, which reports its own peak
resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) at exit. The figure of merit is
``peak(longest) / peak(shortest)`` (issue 11 asks <= 1.3) and ``peak <= --memory-gb``.
Each row also gives the clip length ``auto`` chose and the cost model's estimate
(:mod:`dvis_trt.runtime.memory`). Without ``--bundle`` the tiny test config is exported into
the work folder (needs torch). Runs are sequential (one process at a time); RSS is a
per-process figure, so the machine's other load does not change it much, but allocator
behaviour does: repeat with ``--rounds`` to see the spread.

Each row also reports the tracker's live tracks (max / mean over frames, ``tQ``) and the tracks
born: the hub's arrays and ``tracker_step``'s time grow with ``tQ``, so a flat peak needs a
bounded ``tQ``. ``--make-r50-bundle DIR`` exports the R50 OVIS architecture with the
``"sparse-tracks"`` test weights (:data:`dvis_trt.export.testing.TEST_WEIGHT_PRESETS`: tracks
die and few are born, as with trained weights; the default spread weights grow ``tQ`` without
end on this scene) and ``INPUT.MIN_SIZE_TEST`` = the short side of ``--size`` (64x96 frames stay
64x96 instead of 480x720), into DIR (reused if DIR already holds a manifest), as bundle ``r50``.
Long series can be split into one invocation per length (each its own ``--json``, e.g. one per
lock slot) and joined with ``--table``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def _warm(bundle: Path) -> None:
    """Create every stage's ONNX Runtime session once, here, so that the measured runs find
    the optimized graphs in ORT's graph cache (a cache miss optimizes and writes them: the
    first R50 run peaked at 1,950 MiB instead of 648)."""
    from dvis_trt.runtime.runner import Runner

    with Runner(bundle, "ort", providers="cpu", threads=1, quiet=True) as r:
        for name in r.manifest.stages:
            r.backend.load_stage(name, r.manifest)


def _plan(bundle: Path, video: Path, memory_gb: float) -> dict:
    from dvis_trt.runtime.runner import Runner
    from dvis_trt.runtime.video import open_source

    with Runner(bundle, "ort", providers="cpu", threads=1, quiet=True,
                memory_gb=memory_gb) as r:
        src = open_source(video)
        cost = r.clip_cost(src)
        clip = r.auto_clip_frames(src)
        n = src.num_frames
        return {"clip_frames": clip, "estimate_mib": cost.peak_bytes(clip or n, n) / 2 ** 20}


def _r50_bundle(out: Path, size_hw: tuple, seed: int = 0) -> Path:
    """Export R50 OVIS with the ``"sparse-tracks"`` test weights and ``MIN_SIZE_TEST`` = the
    short side of ``size_hw`` into ``out`` (kept if ``out/manifest.json`` exists)."""
    if (out / "manifest.json").is_file():
        return out
    from dvis_trt.export.checkpoint import write_random_checkpoint
    from dvis_trt.export.named_configs import load_named_config
    from dvis_trt.export.onnx_export import export_from_checkpoint
    from dvis_trt.export.testing import build_test_model

    opts = [f"INPUT.MIN_SIZE_TEST={min(size_hw)}"]
    cfg = load_named_config("r50-ovis", opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.parent / f"{out.name}_sparse_tracks_seed{seed}.pth"
    if not ckpt.is_file():
        write_random_checkpoint(lambda: build_test_model(cfg, seed=seed, preset="sparse-tracks"),
                                ckpt, seed)
    pad = tuple(-(-x // 32) * 32 for x in size_hw)
    export_from_checkpoint("r50-ovis", ckpt, out, overrides=opts, example_size=pad,
                           progress=lambda line: print(f"  {line}", flush=True))
    return out


def _measure(bundle: Path, video: Path, memory_gb: float, threads: int, out: Path) -> dict:
    argv = ["run", str(bundle), str(video), "--output", str(out), "--backend", "ort",
            "--providers", "cpu", "--threads", str(threads), "--quiet", "--no-resume",
            "--clip-frames", "auto", "--memory-gb", str(memory_gb)]
    proc = subprocess.run([sys.executable, str(HERE.parent / "runtime_memory.py"), "--child",
                           "--track-stats", *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pairs(text: str, kind=str) -> dict:
    out = {}
    for part in (text or "").split(","):
        if part.strip():
            k, _, v = part.partition("=")
            out[k.strip()] = kind(v.strip())
    return out


def _table(reports: list) -> str:
    """Markdown table of one or more reports (rows of one bundle joined over reports)."""
    joined: dict = {}
    for rep in reports:
        for name, b in rep["bundles"].items():
            j = joined.setdefault(name, {"memory_gb": b["memory_gb"], "rows": []})
            if j["memory_gb"] != b["memory_gb"]:
                raise SystemExit(f"{name}: runs with different --memory-gb cannot be joined")
            j["rows"] += b["rows"]
    lengths = sorted({r["frames"] for j in joined.values() for r in j["rows"]})
    lines = ["| bundle | --memory-gb | " + " | ".join(f"{n} frames" for n in lengths)
             + " | longest/shortest |", "|---|---|" + "---|" * len(lengths) + "---|"]
    for name, j in joined.items():
        rows = {r["frames"]: r for r in j["rows"]}
        cells = []
        for n in lengths:
            r = rows.get(n)
            cells.append("-" if r is None else
                         f"{max(r['peak_rss_mib']):.0f} MiB (clips {r['clip_frames'] or 'one'}, "
                         f"est. {r['estimate_mib']:.0f}, tQ max {r.get('live_tracks_max', '?')})")
        have = [rows[n] for n in lengths if n in rows]
        ratio = max(have[-1]["peak_rss_mib"]) / min(have[0]["peak_rss_mib"])
        lines.append(f"| {name} | {j['memory_gb']:g} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--make-r50-bundle", default=None, metavar="DIR",
                    help="export the R50 OVIS bundle with the sparse-tracks test weights into DIR "
                         "(reused if present) and measure it as 'r50'")
    ap.add_argument("--lengths", default="16,250,1000,2000")
    ap.add_argument("--size", default="64x96", help="frame size HxW (default 64x96)")
    ap.add_argument("--memory-gb", default="tiny=0.25,r50=1.5", metavar="NAME=GB,...",
                    help="--memory-gb per bundle name (a bare number: for all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default="memory_auto.json")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="only print one table of these reports (runs split by length)")
    args = ap.parse_args(argv)
    if args.table:
        print(_table([json.loads(Path(p).read_text()) for p in args.table]))
        return 0
    h, w = (int(x) for x in args.size.lower().split("x"))
    lengths = [int(x) for x in args.lengths.split(",")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dvis_trt_memauto_"))
    work.mkdir(parents=True, exist_ok=True)
    bundles = {k: Path(v) for k, v in (b.split("=", 1) for b in args.bundle)}
    if args.make_r50_bundle:
        bundles["r50"] = _r50_bundle(Path(args.make_r50_bundle), (h, w))
    if not bundles:
        from runtime_memory import _tiny_bundle  # noqa: E402 - same folder
        bundles = {"tiny": _tiny_bundle(work)}
    budgets = ({k: float(args.memory_gb) for k in bundles}
               if "=" not in args.memory_gb else _pairs(args.memory_gb, float))

    from dvis_trt.runtime.synthetic import make_demo_video

    videos = {}
    for n in lengths:
        p = work / f"scene_{n}f_{h}x{w}.mp4"
        if not p.is_file():
            make_demo_video(p, num_frames=n, size=(h, w), seed=0, lossless=False)
        videos[n] = p
    report = {"size": [h, w], "threads": args.threads, "rounds": args.rounds, "bundles": {},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": sys.version.split()[0]}}
    for name, bundle in bundles.items():
        gb = budgets[name]
        rows = []
        _warm(bundle)
        for n in lengths:
            plan = _plan(bundle, videos[n], gb)
            peaks = [_measure(bundle, videos[n], gb, args.threads, work / f"{name}_{n}.json")
                     for _ in range(args.rounds)]
            rss = [p["peak_rss_bytes"] / 2 ** 20 for p in peaks]
            rows.append({"frames": n, **plan, "peak_rss_mib": rss,
                         "wall_s": [p["wall_s"] for p in peaks],
                         **{k: peaks[-1][k] for k in ("live_tracks_max", "live_tracks_mean",
                                                      "live_tracks_last", "tracks_born")
                            if k in peaks[-1]}})
            print(f"{name} {n:5d} frames: clips {plan['clip_frames'] or 'one'}, peak "
                  f"{max(rss):.0f} MiB (estimate {plan['estimate_mib']:.0f}), "
                  f"{max(rows[-1]['wall_s']):.0f} s, live tracks max "
                  f"{rows[-1].get('live_tracks_max')} mean "
                  f"{rows[-1].get('live_tracks_mean', 0):.1f}, born {rows[-1].get('tracks_born')}",
                  flush=True)
        ratio = max(rows[-1]["peak_rss_mib"]) / min(rows[0]["peak_rss_mib"])
        report["bundles"][name] = {"bundle": str(bundle), "memory_gb": gb, "rows": rows,
                                   "ratio_longest_over_shortest": ratio,
                                   "under_budget": all(max(r["peak_rss_mib"]) <= gb * 1024
                                                       for r in rows)}
    print()
    print(_table([report]))
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
