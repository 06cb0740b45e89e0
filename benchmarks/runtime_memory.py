"""Peak memory (RSS) of ``dvis-trt run --clip-frames N``: a 4x-longer video must not need more.

    python benchmarks/runtime_memory.py [--bundle BUNDLE] [--clip-frames 8] [--short 16]
        [--factor 4] [--size 360x640] [--threads 2] [--json runtime_memory.json] [--no-contrast]

Renders two real MP4s of the same scene generator (:func:`dvis_trt.runtime.synthetic.make_demo_video`,
H.264): a short one (``--short`` frames) and one ``--factor`` times longer. Each is run by
``dvis-trt run BUNDLE VIDEO --clip-frames N`` in a fresh Python process, which reports its own
peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) at exit, so the two runs do not
share allocator state. The ratio long/short is the figure of merit (the issue asks <= 1.3).
Unless ``--no-contrast``, the long video is also run without ``--clip-frames`` (one clip, the
official offline path) to show what the clipping saves.

Default bundle: the tiny test config exported from a seeded spread checkpoint into a temporary
folder (needs torch for that step); pass ``--bundle`` for a real one (e.g. the R50 OVIS bundle).
Prints a table and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(argv) -> int:
    """Run the CLI in this process, then print the peak RSS (bytes) as the last line.

    A leading ``--track-stats`` also reports the tracker's live tracks (``TrackHub.num_live``
    after each frame, wrapped here, not in the runtime): ``live_tracks_max``/``_mean``/``_last``
    and ``tracks_born``."""
    import resource

    from dvis_trt.runtime.cli import main

    stats = None
    if argv and argv[0] == "--track-stats":
        argv = argv[1:]
        from dvis_trt.runtime.pipeline import TrackHub

        stats, hubs, update = [], [], TrackHub.update

        def counted(self, *a, **kw):
            update(self, *a, **kw)
            stats.append(self.num_live)
            if not any(h is self for h in hubs):
                hubs.append(self)
        TrackHub.update = counted
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"rc": rc, "peak_rss_bytes": int(peak_kb) * 1024, "wall_s": wall}
    if stats is not None:
        out.update(live_tracks_max=max(stats, default=0),
                   live_tracks_mean=sum(stats) / max(len(stats), 1),
                   live_tracks_last=stats[-1] if stats else 0,
                   tracks_born=sum(h.next_id for h in hubs))
    print(json.dumps(out))
    return rc


def _measure(bundle: Path, video: Path, clip_frames, threads: int, out_dir: Path) -> dict:
    argv = ["run", str(bundle), str(video), "--output", str(out_dir / f"{video.stem}.json"),
            "--backend", "ort", "--providers", "cpu", "--threads", str(threads), "--quiet"]
    if clip_frames:
        argv += ["--clip-frames", str(clip_frames)]
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tiny_bundle(where: Path) -> Path:
    from dvis_trt.export.checkpoint import write_random_checkpoint
    from dvis_trt.export.onnx_export import export_from_checkpoint
    from dvis_trt.export.testing import build_test_model
    from dvis_trt.export.config import load_config

    cfg_path = ROOT / "export" / "configs" / "tiny.yaml"
    cfg = load_config(cfg_path)
    ckpt = where / "tiny.pth"
    write_random_checkpoint(lambda: build_test_model(cfg, seed=6), ckpt, 6)
    out = where / "bundle_tiny"
    export_from_checkpoint(cfg_path, ckpt, out)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: export the tiny one)")
    ap.add_argument("--clip-frames", type=int, default=8)
    ap.add_argument("--short", type=int, default=16, help="frames of the short video")
    ap.add_argument("--factor", type=int, default=4, help="the long video is this much longer")
    ap.add_argument("--size", default="360x640", help="frame size HxW (default 360x640)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=None, help="where videos/outputs go (default: temp)")
    ap.add_argument("--no-contrast", action="store_true",
                    help="skip the long video without --clip-frames")
    ap.add_argument("--json", default="runtime_memory.json")
    args = ap.parse_args(argv)
    h, w = (int(x) for x in args.size.lower().split("x"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dvis_trt_mem_"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle) if args.bundle else _tiny_bundle(work)

    from dvis_trt.runtime.synthetic import make_demo_video

    n_short, n_long = args.short, args.short * args.factor
    videos = {}
    for name, n in (("short", n_short), ("long", n_long)):
        path = work / f"{name}_{n}f_{h}x{w}.mp4"
        if not path.is_file():
            make_demo_video(path, num_frames=n, size=(h, w), seed=0, lossless=False)
        videos[name] = path
    rows = {}
    rows["short"] = _measure(bundle, videos["short"], args.clip_frames, args.threads, work)
    rows["long"] = _measure(bundle, videos["long"], args.clip_frames, args.threads, work)
    if not args.no_contrast:
        rows["long_one_clip"] = _measure(bundle, videos["long"], None, args.threads, work)
    ratio = rows["long"]["peak_rss_bytes"] / rows["short"]["peak_rss_bytes"]
    report = {
        "bundle": str(bundle), "size": [h, w], "clip_frames": args.clip_frames,
        "threads": args.threads, "frames": {"short": n_short, "long": n_long},
        "runs": {k: {"peak_rss_mib": v["peak_rss_bytes"] / 2 ** 20, "wall_s": v["wall_s"],
                     "frames": n_short if k == "short" else n_long} for k, v in rows.items()},
        "ratio_long_over_short": ratio, "target": 1.3, "pass": ratio <= 1.3,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0]},
    }
    print(f"bundle {bundle}  ({h}x{w}, --clip-frames {args.clip_frames}, {args.threads} threads)")
    for k, v in report["runs"].items():
        clip = "--clip-frames %d" % args.clip_frames if k != "long_one_clip" else "one clip"
        print(f"  {k:14s} {v['frames']:4d} frames  {clip:16s} peak RSS {v['peak_rss_mib']:8.1f} MiB"
              f"  ({v['wall_s']:.1f} s)")
    print(f"  long / short = {ratio:.3f} (target <= 1.3: {'PASS' if ratio <= 1.3 else 'FAIL'})")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"written {args.json}")
    return 0 if ratio <= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main())
