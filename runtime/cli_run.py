"""``dvis-trt run``: videos in, YouTube-VIS results (and an overlay video) out.

Examples::

    dvis-trt run bundle/ video.mp4 --output results.json --overlay overlay.mp4
    dvis-trt run bundle/ clips/*.mp4 frames/0001/ --clip-frames 120 --threads 4
    dvis-trt run bundle/ --ytvis-json ovis/annotations_valid.json --ytvis-root ovis/valid \\
        --output results.json --quiet
"""
from __future__ import annotations

import argparse

from dvis_trt.errors import InputError
from .cli_args import add_main_argument
from .validate import count, number

__all__ = ["add_arguments", "run", "OVERLAY_SUFFIXES"]

#: Containers the overlay writer encodes (H.264 / MPEG-4 Part 2; VP9 for WebM).
OVERLAY_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm")


def _clip_frames(text: str):
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {value}")
    return value




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt run``."""
    from .backends.registry import BACKENDS

    add_main_argument(parser, "bundle", kind="bundle", metavar="BUNDLE", flags=("--bundle",),
                      spill="inputs", related=("inputs",), accepts=("folder",),
                      help="bundle folder (`dvis-trt export`)")
    parser.add_argument("inputs", metavar="INPUT", nargs="*",
                        help="video files (any format FFmpeg reads), folders of frames "
                             "(YouTube-VIS JPEGImages/<video>/), a folder of such folders, or "
                             "images")
    parser.add_argument("--output", "-o", default="results.json", metavar="results.json",
                        help="YouTube-VIS results of all videos (default: results.json)")
    parser.add_argument("--overlay", default=None, metavar="out.mp4",
                        help="also write the video with coloured masks and labels (#track id or "
                             "f<n> for frame-link instances, class, score), same size and "
                             "timestamps as the input (several videos: out_<name>.mp4, or a "
                             "folder)")
    parser.add_argument("--contact-sheet", default=None, metavar="out.png",
                        help="also write a PNG grid of overlay frames, evenly spaced, for a look "
                             "without a video player (several videos: out_<name>.png)")
    parser.add_argument("--contact-sheet-frames", type=count(1, 1000), default=9, metavar="N",
                        help="frames in the contact sheet (default 9, a 3x3 grid)")
    parser.add_argument("--overlay-min-score", type=number(0.0, 1.0), default=0.3, metavar="S",
                        help="instances below this score are not drawn (default 0.3, as the "
                             "official demo)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto (TensorRT engines if built for this GPU, else ONNX Runtime),"
                             " ort, torch (eager baseline, needs --checkpoint), trt")
    parser.add_argument("--providers", default=None, metavar="LIST",
                        help="ONNX Runtime execution providers in priority order, e.g. "
                             "'tensorrt,cuda,cpu' (default: CUDA if available, then CPU)")
    parser.add_argument("--threads", type=count(1, 4096), default=None, metavar="N",
                        help="intra-op threads per engine session (default: all cores)")
    parser.add_argument("--window", type=count(1, 256), default=5, metavar="T",
                        help="frames per segmenter / mask-head call (default 5; results do not "
                             "depend on it)")
    parser.add_argument("--clip-frames", type=_clip_frames, default="auto", metavar="N",
                        help="process long videos in clips of N frames, tracker state carried "
                             "across clips (stable track ids, memory bounded by N). 0: the whole "
                             "video as one clip, as the official offline model. Default 'auto': "
                             "one clip unless the estimated peak memory (clip arrays, the "
                             "refiner's time attention, weights, results) would exceed "
                             "--memory-gb, then the longest clips that fit (the run says so)")
    parser.add_argument("--memory-gb", type=number(0.0, 65536.0, lo_open=True), default=4.0,
                        metavar="GB",
                        help="peak host memory (resident set) that --clip-frames auto keeps the "
                             "run under (default 4)")
    parser.add_argument("--ytvis-json", default=None, metavar="J",
                        help="run every video of a YouTube-VIS / OVIS dataset json")
    parser.add_argument("--ytvis-root", default=None, metavar="DIR",
                        help="folder the json's file_names are relative to (e.g. "
                             "valid/JPEGImages)")
    parser.add_argument("--class-names", default=None, metavar="a,b,...|FILE",
                        help="class names in class order: comma-separated, a text file (one per "
                             "line) or a JSON list (default: from the bundle)")
    parser.add_argument("--checkpoint", default=None, metavar="model.pth",
                        help="weights for --backend torch (default: the checkpoint the bundle's "
                             "manifest records)")
    parser.add_argument("--config", "--config-file", dest="config_file", default=None,
                        metavar="NAME|CFG.yaml",
                        help="config for --backend torch, a name or a YAML file (default: the one "
                             "the bundle was exported with)")
    parser.add_argument("--lenient", action="store_true",
                        help="decode damaged video files past errors (like ffmpeg) instead of "
                             "refusing them")
    parser.add_argument("--keep-going", action="store_true",
                        help="in a batch, also skip videos that fail for other reasons than "
                             "being unreadable (stage errors, out of memory) instead of "
                             "stopping; unreadable videos are always reported and skipped")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="each finished video is committed at once to <output>.shards/; "
                             "a later run with the same --output skips the videos finished "
                             "with the same bundle and options (default: on when that folder "
                             "exists). --no-resume runs every video again")
    ray = parser.add_argument_group(
        "Ray (a collection on a cluster; pip install 'dvis-trt[ray]'; see docs/scale_out.md)")
    ray.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                     help="run the videos on a Ray cluster, one video per task, on a pool of "
                          "actors that each load the bundle once. ADDRESS: 'auto' (default: "
                          "RAY_ADDRESS, else a running local cluster, else a new local one), "
                          "'local', host:port or ray://host:port")
    ray.add_argument("--workers", type=count(1, 100_000), default=None, metavar="N",
                     help="actors (default: one per GPU, else one per 4 CPUs of the cluster)")
    ray.add_argument("--ray-cpus-per-worker", type=number(0.0, 4096.0, lo_open=True), default=None, metavar="C",
                     help="CPUs each actor reserves; also its ONNX Runtime threads unless "
                          "--threads (default: the cluster's CPUs split over the actors, "
                          "at most 4)")
    ray.add_argument("--ray-gpus-per-worker", type=number(0.0, 64.0), default=None, metavar="G",
                     help="GPUs each actor reserves (default: 1 when the cluster has GPUs, "
                          "else 0)")
    ray.add_argument("--ray-retries", type=count(0, 100), default=2, metavar="N",
                     help="times a video is retried when its worker process dies while "
                          "running it (default 2); after that it is reported as failed")
    ray.add_argument("--ray-bundle", choices=("auto", "ship", "shared"), default="auto",
                     help="ship: put the bundle in the object store once (each node unpacks "
                          "it once); shared: workers read BUNDLE's path (mounted on every "
                          "node); auto: shared on a one-node cluster, else ship")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the sha256 check of the bundle files")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar and no summary lines (errors still go to stderr)")


def read_paths(args: argparse.Namespace) -> list:
    """``(option, path)`` of every file or folder ``run`` reads besides the videos (for the
    output-safety rule, :func:`dvis_trt.outputs.check_outputs`)."""
    from pathlib import Path

    reads = [("the bundle", args.bundle), ("--ytvis-json", args.ytvis_json),
             ("--ytvis-root", args.ytvis_root), ("--checkpoint", args.checkpoint),
             ("--config-file", args.config_file)]
    if args.class_names is not None and Path(args.class_names).is_file():
        reads.append(("--class-names", args.class_names))
    if args.bundle is not None and Path(args.bundle).is_dir():
        from dvis_trt.errors import DvisTrtError
        from .bundle import load_manifest
        from .provenance import recorded_sources
        try:  # the bundle's own checkpoint and config are never written over either
            reads += recorded_sources(load_manifest(args.bundle, verify=False,
                                            require_stages=None))
        except (DvisTrtError, OSError, ValueError):
            pass  # a bundle that does not load is reported, in one line, when the run loads it
    return [(label, p) for label, p in reads if p is not None]


def run(args: argparse.Namespace) -> int:
    """Run the videos; returns 0, or 2 when some videos of a batch were skipped (errors that
    stop the run raise :class:`~dvis_trt.errors.DvisTrtError`)."""
    from .inputs import check_outputs, discover_inputs, load_class_names, overlay_paths
    from .runner import Runner, run_videos
    from .cli_args import resolve_main_arguments

    resolve_main_arguments(args)
    from .bundle import load_manifest

    if args.overlay_min_score < 0 or args.overlay_min_score > 1:
        raise InputError(f"--overlay-min-score must be in [0, 1], got {args.overlay_min_score}")
    from pathlib import Path

    if args.output is not None and Path(args.output).is_dir():
        raise InputError(f"--output {args.output} is a folder; give a file name, e.g. "
                         f"{Path(args.output) / 'results.json'}")
    if args.contact_sheet is not None and not Path(args.contact_sheet).is_dir() and \
            not str(args.contact_sheet).endswith(("/", "\\")) and \
            Path(args.contact_sheet).suffix.lower() != ".png":
        raise InputError(f"--contact-sheet {args.contact_sheet}: give a .png file (or a folder "
                         "for several videos)")
    if args.overlay is not None and not Path(args.overlay).is_dir() and \
            not str(args.overlay).endswith(("/", "\\")) and \
            Path(args.overlay).suffix.lower() not in OVERLAY_SUFFIXES:
        raise InputError(f"--overlay {args.overlay}: use one of "
                         f"{', '.join(OVERLAY_SUFFIXES)} (or a folder for several videos)")
    if args.ray is not None:  # the collection on a Ray cluster (runtime/ray_runner.py)
        from .ray_runner import run_from_args

        return run_from_args(args)
    given = [o for o, v in (("--workers", args.workers), ("--ray-cpus-per-worker",
             args.ray_cpus_per_worker), ("--ray-gpus-per-worker", args.ray_gpus_per_worker))
             if v is not None]
    if given:
        raise InputError(f"{given[0]} applies to Ray runs; add --ray (see docs/scale_out.md)")
    jobs, category_ids = discover_inputs(args.inputs, args.ytvis_json, args.ytvis_root,
                                         strict=not args.lenient)
    # the output-safety rule before anything is loaded or written (run_videos checks again)
    check_outputs(jobs, args.output, overlay_paths(args.overlay, jobs), reads=read_paths(args))
    manifest = load_manifest(args.bundle, verify=not args.no_verify)
    names = load_class_names(args.class_names, manifest.config.num_classes,
                             manifest.config.class_names)
    with Runner(manifest, args.backend, threads=args.threads, window=args.window,
                clip_frames=args.clip_frames, memory_gb=args.memory_gb, class_names=names, category_ids=category_ids,
                quiet=args.quiet, overlay_min_score=args.overlay_min_score,
                providers=args.providers, checkpoint=args.checkpoint,
                config_file=args.config_file) as runner:
        summary = run_videos(runner, jobs, args.output, args.overlay, keep_going=args.keep_going,
                             resume=args.resume, key_options={"lenient": bool(args.lenient)},
                             reads=read_paths(args),
                             contact_sheet=args.contact_sheet,
                             sheet_frames=args.contact_sheet_frames)
    return summary.exit_code
