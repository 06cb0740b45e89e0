"""The ``dvis-trt`` command line: ``demo``, ``export``, ``configs``, ``check``, ``build``, ``run``,
``bench``, ``build-plugins``. The conventions every sub-command follows (main object positional,
older flags kept as aliases, help on every option, extras named) are in
:mod:`dvis_trt.runtime.cli_args`.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their sub-command runs, so ``dvis-trt run``
works on an edge install without torch or TensorRT. A :class:`DvisTrtError` (or a missing
optional dependency) becomes one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .cli_args import resolve_main_arguments
from dvis_trt.errors import DependencyError, DvisTrtError
from .extras import extra_for, missing_message

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("dvis_trt.export.cli_demo",
             "make a demo bundle (random weights) and a real MP4, run it end to end"),
    "export": ("dvis_trt.export.cli_export",
               "export a DVIS-DAQ offline checkpoint to a bundle of per-stage ONNX graphs"),
    "configs": ("dvis_trt.export.cli_configs",
                "list the config names --config accepts (r50-ovis, vitl-ytvis19, ...)"),
    "check": ("dvis_trt.export.cli_check",
              "compare a bundle's stages with eager PyTorch (or TensorRT with ONNX Runtime)"),
    "quantize": ("dvis_trt.export.cli_quantize",
                 "an int8 copy of an fp32 bundle, calibrated on your video(s), with its "
                 "accuracy report"),
    "build": ("dvis_trt.engine.cli_build", "build TensorRT engines for a bundle (GPU)"),
    "run": ("dvis_trt.runtime.cli_run", "run videos through a bundle; write YouTube-VIS results"),
    "stream": ("dvis_trt.runtime.cli_stream",
               "run a live source (camera, stream URL, file) online; JSON Lines per frame"),
    "bench": ("dvis_trt.benchmarks.cli_bench",
              "benchmark backends side by side against the PyTorch baseline"),
    "build-plugins": ("dvis_trt.plugins.cli",
                      "compile the MSDeformAttn plugin libraries (CPU twin, CUDA, TensorRT)"),
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shared by the sub-commands' options)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _load(name: str):
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # an optional extra is not installed
        missing = exc.name or str(exc)
        if missing.startswith("dvis_trt"):
            raise
        raise DependencyError(missing_message(missing, name), exit_code=3) from None


class _VersionAction(argparse.Action):
    """``--version``: the package, ONNX Runtime, torch / TensorRT when present, the plugin."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the versions of dvis-trt, ONNX Runtime, torch and TensorRT (when "
                      "installed) and the MSDeformAttn plugin build, then exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


def version_text() -> str:
    """The ``--version`` lines (no heavy import: versions come from package metadata)."""
    from importlib import metadata

    from dvis_trt import __version__

    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"dvis-trt {__version__}", f"  onnxruntime {ver('onnxruntime')}",
             f"  torch {ver('torch')}"]
    trt = ver("tensorrt")
    if trt == "not installed":
        trt = next((v for v in (ver("tensorrt-cu12"), ver("tensorrt-cu13"), ver("tensorrt_libs"))
                    if v != "not installed"), trt)
    lines.append(f"  tensorrt {trt}")
    try:
        from dvis_trt.plugins import KINDS, find_library, source_hash
        built = [f"{k} {p}" for k in KINDS for p in [find_library(k)] if p is not None]
        lines.append(f"  plugin sources {source_hash()}: "
                     + ("; ".join(built) if built else "not built (dvis-trt build-plugins)"))
    except Exception as exc:  # noqa: BLE001 - --version must always print
        lines.append(f"  plugin: unknown ({type(exc).__name__}: {exc})")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the house rule for bad input), usage on --help only."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dvis-trt",
        description="Deployment-optimized inference for DVIS-DAQ offline video instance "
                    "segmentation.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="run `dvis-trt COMMAND --help` for its options")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        if command not in COMMANDS:
            parser = build_parser()
            if command is None:
                parser.print_help() if not argv else parser.parse_args(argv)
                return 0 if argv else 1
            parser.parse_args(argv)  # prints the usage error for an unknown command
            return 2
        parser = build_parser(only=command)
        args = parser.parse_args(argv)
        args._argv = argv  # the command line as given (for messages and records)
        resolve_main_arguments(args, argv, command)
        return int(_load(command).run(args) or 0)
    except DvisTrtError as err:
        print(f"dvis-trt: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("dvis-trt: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, read-only folder, permission denied, ...
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"dvis-trt: error: cannot write or read{where}: {exc.strerror or exc} "
              "(check the path, its permissions and the free disk space)", file=sys.stderr)
        return 74
    except MemoryError:
        print("dvis-trt: error: out of memory; try a smaller --clip-frames or --window",
              file=sys.stderr)
        return 3
    except Exception as exc:  # last resort: one line, full traceback only when asked
        if os.environ.get("DVIS_TRT_DEBUG"):
            raise
        if isinstance(exc, ModuleNotFoundError) and extra_for(exc.name or ""):
            # an optional extra the command imports while it runs
            print(f"dvis-trt: error: {missing_message(exc.name, command)}", file=sys.stderr)
            return 3
        print(f"dvis-trt: internal error: {type(exc).__name__}: {exc} "
              f"(set DVIS_TRT_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
