"""``dvis-trt bench``: backends side by side against the eager PyTorch baseline.

Example (R50 OVIS bundle, 360p video, eager torch vs ONNX Runtime on CPU)::

    dvis-trt bench bundles/r50_ovis clip360p.mp4 --backends torch,ort --out bench_out/

(the eager baseline's weights are the checkpoint the bundle's manifest records; ``--checkpoint``
overrides it; ``--bundle B --video V`` is the older spelling, kept)

writes ``bench_out/bench.json`` (appended history), ``bench_out/bench.md`` and
``bench_out/bench.png``; ``--compare old.json`` prints the deltas against the last run in
``old.json``. Exit status 0, or 1 when a backend's output differs from the baseline (its row is
marked invalid and no speed is reported for it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dvis_trt.errors import InputError

__all__ = ["add_arguments", "run", "parse_int_list"]



from dvis_trt.runtime.validate import count, number  # noqa: E402

def parse_int_list(text: str, what: str) -> list:
    """``"12,48,192"`` -> ``[12, 48, 192]``; raises InputError naming ``what``."""
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise InputError(f"{what} must be positive integers, got {text!r}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt bench``."""
    from .harness import BACKENDS
    parser.add_argument("paths", nargs="*", metavar="BUNDLE... VIDEO",
                        help="one or more exported bundles, then the video file or frame folder "
                             "to run (decoded once per round); several bundles compare MSDA "
                             "modes (--msda onnx / plugin / trt-builtin exports of the same "
                             "weights)")
    parser.add_argument("--bundle", action="append", default=None, metavar="BUNDLE/",
                        help="same as a positional BUNDLE (the older spelling, kept; repeatable)")
    parser.add_argument("--video", default=None, metavar="VIDEO",
                        help="same as the positional VIDEO (the older spelling, kept)")
    parser.add_argument("--backends", default="torch,ort",
                        help="comma-separated, from: " + "; ".join(
                            f"{k} = {v}" for k, v in BACKENDS.items()) + " (default torch,ort)")
    w = parser.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", metavar="model.pth",
                   help="weights of the eager baseline (default: the checkpoint the bundle's "
                        "manifest records; refused if that file changed since the export)")
    w.add_argument("--test-weights", type=int, metavar="SEED",
                   help="baseline with the spread random test weights of this seed "
                        "(dvis_trt.export.testing.build_test_model), for bundles exported from "
                        "them")
    w.add_argument("--no-baseline", action="store_true",
                   help="no eager PyTorch model at all (not with --backends torch): fp32 rows "
                        "are timed with their parity unchecked, int8/fp16/bf16 rows are still "
                        "judged by the accuracy report against their fp32 twin of the run; "
                        "saves the eager reference run"),
    parser.add_argument("--config", "--config-file", dest="config_file", metavar="NAME|CFG.yaml",
                        help="config of the eager model, a name (`dvis-trt configs`) or a YAML "
                             "file (default: the one the bundle was exported with)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for --config-file")
    parser.add_argument("--threads", type=count(1, 4096), default=None,
                        help="compute threads for every backend (torch intra-op, ORT intra-op, "
                             "mask resize); default: all available CPUs")
    parser.add_argument("--affinity", action="store_true",
                        help="also pin the process to the first --threads CPUs")
    parser.add_argument("--frames", type=count(1, 1_000_000), default=None, metavar="N",
                        help="use the first N frames of the video (default: all)")
    parser.add_argument("--window", type=count(1, 256), default=5, metavar="T",
                        help="frames per segmenter call (default 5, the official window)")
    parser.add_argument("--warmup", type=count(0, 1000), default=1,
                        help="untimed runs per backend (default 1; the first one is also the "
                             "parity run, so one is always made)")
    parser.add_argument("--repeats", type=count(1, 1000), default=3,
                        help="timed end-to-end rounds per backend, alternating (default 3)")
    parser.add_argument("--stage-iters", type=count(1, 100_000), default=10,
                        help="max timed calls per stage and backend (default 10)")
    parser.add_argument("--stage-budget", type=number(0.0, 86400.0, lo_open=True), default=30.0, metavar="SEC",
                        help="about this many seconds per stage micro-benchmark; fewer "
                             "iterations (>= 3) for slow stages (default 30)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage runs")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--gemm-seconds", type=number(0.0, 3600.0), default=2.0,
                        help="seconds per engine of the sustained-GEMM probe (default 2)")
    parser.add_argument("--gemm-sizes", default="1024,2048",
                        help="GEMM probe matrix sizes, comma-separated (default 1024,2048)")
    parser.add_argument("--memory", choices=("inprocess", "isolated", "off"), default="inprocess",
                        help="peak memory: sampled in this process (includes every loaded "
                             "model), 'isolated' = one extra run per backend in its own process "
                             "(honest per-backend peaks), or off")
    parser.add_argument("--parity-iou", type=number(0.0, 1.0), default=0.9,
                        help="min video mask IoU of paired instances (fp32 rows; default 0.9)")
    parser.add_argument("--parity-score-atol", type=number(0.0, 1.0), default=1e-2,
                        help="max |score difference| of paired instances (fp32; default 1e-2; "
                             "reduced-precision rows use 5e-2)")
    parser.add_argument("--profile-ops", action="store_true",
                        help="also profile one stage by op type in each backend (ORT's profiler, "
                             "torch.profiler): where that stage's time goes")
    parser.add_argument("--profile-stage", default="segmenter",
                        help="stage for --profile-ops (default segmenter)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the pipeline vs frames and vs resolution")
    parser.add_argument("--sweep-frames", default="12,48,192", help="frames sweep (12,48,192)")
    parser.add_argument("--sweep-sizes", default="360,480,720",
                        help="resolution sweep, frame heights at 16:9 (360,480,720)")
    parser.add_argument("--sweep-backends", default=None,
                        help="backends in the sweep (default: every timed row)")
    parser.add_argument("--sweep-repeats", type=count(1, 1000), default=1, help="runs per sweep point (1)")
    parser.add_argument("--mode", choices=("offline", "online", "near-online", "all"),
                        default="offline",
                        help="offline (default): the backends side by side; online / "
                             "near-online / all: per-frame latency (arrival -> result) p50/p90/"
                             "p99 and throughput of those modes next to offline, on the first "
                             "of --backends (see docs/benchmarks.md)")
    parser.add_argument("--clip-frames", default="5,15", metavar="N,N",
                        help="near-online clip lengths to time (default 5,15)")
    parser.add_argument("--out", default="bench_out", metavar="DIR",
                        help="folder for bench.json / bench.md / bench.png (default bench_out)")
    parser.add_argument("--json", default=None, help="JSON history file (default OUT/bench.json)")
    parser.add_argument("--markdown", default=None, help="markdown file (default OUT/bench.md)")
    parser.add_argument("--plot", default=None, help="PNG file (default OUT/bench.png)")
    parser.add_argument("--compare", default=None, metavar="OLD.json",
                        help="print deltas against the last run in this bench JSON")
    parser.add_argument("--label", default=None, help="free text stored with the run")
    parser.add_argument("--quiet", action="store_true", help="only the summary lines")


def run(args: argparse.Namespace) -> int:
    """Run the bench, write the three outputs, print the summary (and the comparison)."""
    from .harness import BenchOptions, run_bench
    from .parity import LOWP_PRECISIONS
    from .report import compare, load_runs, write_outputs

    from dvis_trt.runtime.cli_args import resolve_bundles_and_video
    from dvis_trt.runtime.extras import require

    for module in ("psutil", "matplotlib"):  # the bench extra: say so before minutes of work
        require(module, "bench")

    full = getattr(args, "_argv", None)  # the command line as given (dvis_trt.runtime.cli.main)
    argv = list(full[1:]) if full else None
    args.bundle, args.video = resolve_bundles_and_video(args.paths, args.bundle, args.video, full)
    from dvis_trt.runtime.validate import clamp_threads
    args.threads = clamp_threads(args.threads)
    if getattr(args, "mode", "offline") != "offline":  # latency of the low-latency modes
        from .latency import run_cli
        return run_cli(args)
    backends = [b.strip() for b in str(args.backends).split(",") if b.strip()]
    old = load_runs(args.compare)[-1] if args.compare else None  # fail early on a bad file
    out_dir = Path(args.out)
    from dvis_trt.outputs import check_outputs  # the output-safety rule, before anything runs
    check_outputs([("--json", args.json or out_dir / "bench.json"),
                   ("--markdown", args.markdown or out_dir / "bench.md"),
                   ("--plot", args.plot or out_dir / "bench.png")],
                  [*(("--bundle", b) for b in args.bundle), ("--video", args.video),
                   ("--checkpoint", args.checkpoint), ("--config-file", args.config_file)])
    opts = BenchOptions(
        bundles=list(args.bundle), video=args.video, backends=backends,
        checkpoint=args.checkpoint, test_weights=args.test_weights,
        no_baseline=args.no_baseline, config_file=args.config_file, overrides=list(args.opts or []), threads=args.threads,
        affinity=args.affinity, max_frames=args.frames, window=args.window, warmup=args.warmup,
        repeats=args.repeats, stage_iters=args.stage_iters, stage_budget=args.stage_budget,
        stages=not args.no_stages, flops=not args.no_flops, gemm_seconds=args.gemm_seconds,
        gemm_sizes=parse_int_list(args.gemm_sizes, "--gemm-sizes"), memory=args.memory, parity_iou=args.parity_iou,
        parity_score_atol=args.parity_score_atol, sweep=args.sweep,
        profile_ops=args.profile_ops, profile_stage=args.profile_stage,
        sweep_frames=parse_int_list(args.sweep_frames, "--sweep-frames"),
        sweep_sizes=parse_int_list(args.sweep_sizes, "--sweep-sizes"),
        sweep_backends=[b.strip() for b in args.sweep_backends.split(",")]
        if args.sweep_backends else None,
        sweep_repeats=args.sweep_repeats, label=args.label, argv=argv,
        log=(lambda s: None) if args.quiet else (lambda s: print(s, flush=True)))
    rec = run_bench(opts)
    paths = write_outputs(rec, args.json or out_dir / "bench.json",
                          args.markdown or out_dir / "bench.md", args.plot or out_dir / "bench.png")
    invalid = []
    for key, row in rec["e2e"].items():
        if row.get("skipped"):
            print(f"{key}: skipped ({row['skipped']})")
        elif row.get("valid") is False and row.get("precision") in LOWP_PRECISIONS:
            invalid.append(key)  # timed all the same: the accuracy report states the trade
            print(f"{key}: accuracy FAIL vs {row['parity'].get('against')} "
                  f"({row['parity']['accuracy']['verdict']}); "
                  f"{row['wall_s']['p50']:.2f} s per {row['frames']}-frame clip")
        elif row.get("valid") is False:
            invalid.append(key)
            print(f"{key}: INVALID — output differs from the eager baseline "
                  f"({row['parity'].get('reason')})")
        elif "wall_s" in row:
            print(f"{key}: {row['wall_s']['p50']:.2f} s per {row['frames']}-frame clip, "
                  f"{row['fps']:.3f} FPS ({row['fps_with_decode']:.3f} with decode)")
    for k, r in rec["ratios"].items():
        print(f"{k}: speedup min {r['min']:.2f} / median {r['median']:.2f} / max {r['max']:.2f}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if old is not None:
        print(compare(old, rec))
    return 1 if invalid else 0
