"""``dvis-trt build BUNDLE``: TensorRT engines for every stage of a bundle, for this GPU."""
from __future__ import annotations

import argparse

from dvis_trt.errors import InputError

from .profiles import RESOLUTION_PRESETS, BuildLimits
from dvis_trt.runtime.cli import positive_int as _positive





from dvis_trt.runtime.validate import count, number  # noqa: E402

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dvis_trt.runtime.cli_args import add_main_argument

    add_main_argument(parser, "bundle", kind="bundle", metavar="BUNDLE", flags=("--bundle",),
                      accepts=("folder",), help="bundle folder written by `dvis-trt export`")
    lim = parser.add_argument_group("limits (they size the optimization profiles)")
    lim.add_argument("--window", type=_positive, default=5,
                     help="frames per segmenter call (default 5, as the official forward)")
    lim.add_argument("--max-frames", type=_positive, default=100,
                     help="longest clip the refiner sees; `run --clip-frames` must not exceed "
                          "it (default 100)")
    lim.add_argument("--resolutions", default="360p,480p,720p",
                     help="comma-separated video sizes to cover, presets "
                          f"({', '.join(RESOLUTION_PRESETS)}) or WxH; landscape and portrait "
                          "are both built (default 360p,480p,720p)")
    lim.add_argument("--max-tracks", type=_positive, default=None,
                     help="most live tracks in one tracker step (default 2 x NUM_NEW_INS)")
    lim.add_argument("--opt-tracks", type=_positive, default=None,
                     help="track count the tracker kernels are tuned for (default 32)")
    lim.add_argument("--max-num", type=_positive, default=None,
                     help="most instances per mask-head call (default: config TEST.MAX_NUM)")
    lim.add_argument("--mask-window", type=_positive, default=None,
                     help="most frames per mask-head call (default max(window, "
                          "TEST.WINDOW_SIZE))")
    lim.add_argument("--profile-mode", choices=("buckets", "range"), default="buckets",
                     help="buckets: one exact profile per padded size + a covering one "
                          "(fastest engines); range: one covering profile (fastest build)")
    b = parser.add_argument_group("builder")
    b.add_argument("--workspace", type=number(0.0, 65536.0, lo_open=True), default=None, metavar="GIB",
                   help="builder workspace limit in GiB (default: TensorRT's, the GPU memory)")
    b.add_argument("--opt-level", type=int, choices=range(0, 6), default=None,
                   help="TensorRT builder optimization level 0-5 (default 3)")
    b.add_argument("--plugin-lib", default=None,
                   help="our TensorRT MSDA plugin library (for --msda plugin bundles; default: "
                        "$DVIS_TRT_PLUGIN_LIB or the one `dvis-trt build-plugins` made)")
    b.add_argument("--allow-gridsample", action="store_true",
                   help="build an --msda onnx (GridSample) bundle anyway; such engines are "
                        "known to come out silently wrong on recent TensorRT: check them")
    b.add_argument("--stages", default=None,
                   help="comma-separated subset of stages to build (default: all)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--device", type=count(0, 1024), default=0, help="CUDA device index (default 0)")


def limits_from_args(args: argparse.Namespace) -> BuildLimits:
    """The :class:`BuildLimits` the flags describe (raises :class:`InputError`)."""
    res = tuple(r.strip() for r in str(args.resolutions).split(",") if r.strip())
    if not res:
        raise InputError("--resolutions is empty; give at least one, e.g. 480p")
    return BuildLimits(window=args.window, max_frames=args.max_frames, resolutions=res,
                       max_tracks=args.max_tracks, opt_tracks=args.opt_tracks,
                       max_num=args.max_num, mask_window=args.mask_window,
                       mode=args.profile_mode)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from dvis_trt.errors import DependencyError
    from dvis_trt.runtime.cli_args import resolve_main_arguments

    resolve_main_arguments(args)

    if importlib.util.find_spec("tensorrt") is None:  # say the first thing a user must fix first
        raise DependencyError("building engines needs TensorRT and an NVIDIA GPU: install TensorRT "
                              "(pip install tensorrt, or JetPack on Jetson) on the GPU machine; "
                              "see docs/deploy_gpu.md")
    from .builder import build_engines  # noqa: PLC0415 - imports polygraphy/tensorrt lazily
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    build_engines(args.bundle, limits_from_args(args), workspace_gib=args.workspace,
                  plugin_library=args.plugin_lib, allow_gridsample=args.allow_gridsample,
                  stages=stages, force=args.force, optimization_level=args.opt_level,
                  device=args.device)
    return 0
