"""Peak memory (RSS) of ``dvis-trt run --clip-frames auto`` against video length: flat by design.

    python benchmarks/memory_auto.py --bundle tiny=BUNDLE_DIR [--bundle r50=BUNDLE_DIR ...]
        [--lengths 16,250,1000,2000] [--size 64x96] [--memory-gb tiny=0.25,r50=1.5]
        [--threads 2] [--work-dir DIR] [--json memory_auto.json]

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


def _measure(bundle: Path, video: Path, memory_gb: float, threads: int, out: Path) -> dict:
    argv = ["run", str(bundle), str(video), "--output", str(out), "--backend", "ort",
            "--providers", "cpu", "--threads", str(threads), "--quiet", "--no-resume",
            "--clip-frames", "auto", "--memory-gb", str(memory_gb)]
    proc = subprocess.run([sys.executable, str(HERE.parent / "runtime_memory.py"), "--child",
                           *argv], capture_output=True, text=True, check=False)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--lengths", default="16,250,1000,2000")
    ap.add_argument("--size", default="64x96", help="frame size HxW (default 64x96)")
    ap.add_argument("--memory-gb", default="tiny=0.25,r50=1.5", metavar="NAME=GB,...",
                    help="--memory-gb per bundle name (a bare number: for all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default="memory_auto.json")
    args = ap.parse_args(argv)
    h, w = (int(x) for x in args.size.lower().split("x"))
    lengths = [int(x) for x in args.lengths.split(",")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dvis_trt_memauto_"))
    work.mkdir(parents=True, exist_ok=True)
    bundles = {k: Path(v) for k, v in (b.split("=", 1) for b in args.bundle)}
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
        for n in lengths:
            plan = _plan(bundle, videos[n], gb)
            peaks = [_measure(bundle, videos[n], gb, args.threads, work / f"{name}_{n}.json")
                     for _ in range(args.rounds)]
            rss = [p["peak_rss_bytes"] / 2 ** 20 for p in peaks]
            rows.append({"frames": n, **plan, "peak_rss_mib": rss,
                         "wall_s": [p["wall_s"] for p in peaks]})
            print(f"{name} {n:5d} frames: clips {plan['clip_frames'] or 'one'}, peak "
                  f"{max(rss):.0f} MiB (estimate {plan['estimate_mib']:.0f})", flush=True)
        ratio = max(rows[-1]["peak_rss_mib"]) / min(rows[0]["peak_rss_mib"])
        report["bundles"][name] = {"bundle": str(bundle), "memory_gb": gb, "rows": rows,
                                   "ratio_longest_over_shortest": ratio,
                                   "under_budget": all(max(r["peak_rss_mib"]) <= gb * 1024
                                                       for r in rows)}
    print("\n| bundle | --memory-gb | " + " | ".join(f"{n} frames" for n in lengths)
          + " | longest/shortest |")
    print("|---|---|" + "---|" * len(lengths) + "---|")
    for name, b in report["bundles"].items():
        cells = [f"{max(r['peak_rss_mib']):.0f} MiB (clips {r['clip_frames'] or 'one'})"
                 for r in b["rows"]]
        print(f"| {name} | {b['memory_gb']:g} | " + " | ".join(cells)
              + f" | {b['ratio_longest_over_shortest']:.2f}x |")
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
