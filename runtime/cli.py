"""The ``dvis-trt`` command line: ``demo``, ``export``, ``check``, ``build``, ``run``, ``bench``,
``build-plugins``.

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

from .errors import DvisTrtError

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("dvis_trt.runtime.cli_demo",
             "make a demo bundle (random weights) and a real MP4, run it end to end"),
    "export": ("dvis_trt.export.cli_export",
               "export a DVIS-DAQ offline checkpoint to a bundle of per-stage ONNX graphs"),
    "check": ("dvis_trt.export.cli_check",
              "compare a bundle's stages with eager PyTorch (or TensorRT with ONNX Runtime)"),
    "build": ("dvis_trt.engine.cli_build", "build TensorRT engines for a bundle (GPU)"),
    "run": ("dvis_trt.runtime.cli_run", "run videos through a bundle; write YouTube-VIS results"),
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
        extra = {"torch": "export", "onnx": "export", "tensorrt": "engine",
                 "polygraphy": "engine", "matplotlib": "bench"}.get(missing.split(".")[0], "all")
        raise DvisTrtError(
            f"'dvis-trt {name}' needs the Python package '{missing}', which is not installed; "
            f"install it (pip install 'dvis-trt[{extra}]')") from None


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the house rule for bad input), usage on --help only."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dvis-trt",
        description="Deployment-optimized inference for DVIS-DAQ offline video instance "
                    "segmentation.")
    from dvis_trt import __version__
    parser.add_argument("--version", action="version", version=f"dvis-trt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
        print(f"dvis-trt: internal error: {type(exc).__name__}: {exc} "
              f"(set DVIS_TRT_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
