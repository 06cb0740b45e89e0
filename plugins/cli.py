"""``dvis-trt build-plugins``: build the MSDeformAttn plugin libraries (CPU twin, CUDA kernel, TensorRT plugin).

Runs CMake on this package's sources into the user cache folder (or ``--build-dir``) and prints what was and
wasn't built and where the libraries are. The CPU twin is always built; the CUDA kernel when nvcc is found; the
TensorRT plugin when nvcc and TensorRT headers (``--tensorrt-root`` / ``TENSORRT_ROOT`` /
``TensorRT_INCLUDE_DIR``) are found. ``--list`` only shows which libraries are found where.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the build-plugins options to ``parser``."""
    parser.add_argument("--build-dir", default=None,
                        help="CMake build folder (default: the user cache, see `--list`)")
    parser.add_argument("--cuda", choices=["auto", "on", "off"], default="auto",
                        help="build the CUDA kernel library (auto: when nvcc is found)")
    parser.add_argument("--trt", choices=["auto", "on", "off"], default="auto",
                        help="build the TensorRT plugin (auto: when nvcc and TensorRT headers are found)")
    parser.add_argument("--cuda-archs", default=None,
                        help='CUDA architectures, e.g. "90" or "80-real;86-real;90" '
                             "(default: sm_80, sm_86, sm_87, sm_89, sm_90 + PTX)")
    parser.add_argument("--tensorrt-root", default=None, help="TensorRT install prefix holding include/NvInfer.h")
    parser.add_argument("--tensorrt-include-dir", default=None, help="folder holding NvInfer.h")
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel build jobs (default: CPU count)")
    parser.add_argument("--verbose", action="store_true", help="show the CMake / compiler output")
    parser.add_argument("--list", action="store_true", help="only list the libraries found and the search folders")


def _list() -> int:
    from dvis_trt.plugins import KINDS, find_library, library_filename, search_dirs

    print("search folders (in order):")
    for d in search_dirs():
        print(f"  {d}")
    for kind in KINDS:
        p = find_library(kind)
        print(f"{kind:5s} {library_filename(kind):24s} {p if p else 'not found'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Build (or with ``--list`` locate) the plugin libraries; returns the exit status (0 on success).

    Raises DependencyError (cmake / compiler missing, build failure, or ``--cuda on`` / ``--trt on`` that cannot
    be honoured) and InputError for bad option values; the CLI prints them as one line.
    """
    if getattr(args, "list", False):
        return _list()
    from dvis_trt.plugins import build, library_filename

    res = build(args.build_dir, cuda=args.cuda, trt=args.trt, cuda_archs=args.cuda_archs,
                tensorrt_root=args.tensorrt_root, tensorrt_include_dir=args.tensorrt_include_dir,
                jobs=args.jobs, verbose=args.verbose)
    print(f"build folder: {res.build_dir}")
    for line in res.summary.strip().splitlines():
        print(f"  {line}")
    for kind, path in res.libraries.items():
        print(f"{kind:5s} {library_filename(kind):24s} {path}")
    if "trt" in res.libraries:
        print("TensorRT: load the plugin before parsing or deserialising, e.g. "
              f"tensorrt.get_plugin_registry().load_library('{res.libraries['trt']}')")
    return 0


def main(argv=None) -> int:  # pragma: no cover - convenience entry (python -m dvis_trt.plugins.cli)
    from dvis_trt.errors import DvisTrtError

    parser = argparse.ArgumentParser(prog="dvis-trt build-plugins", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DvisTrtError as e:
        print(f"dvis-trt: error: {e}")
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
