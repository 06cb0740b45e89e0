"""``dvis-trt quantize``: an int8 copy of an fp32 bundle, calibrated on your video(s).

Example::

    dvis-trt quantize bundles/r50 --calibration clips/ --calibration-frames 32 \\
        --output bundles/r50_int8

Exit status: 0 when the accuracy report (against the fp32 bundle, on ``--validation`` or the
calibration videos) passes its thresholds, **1 when its verdict fails** -- the int8 bundle and
its ``accuracy.json`` are still written, so you can inspect it, re-calibrate or ``--exclude``
more nodes; with ``--no-report`` there is no verdict and the exit status is 0.

The input bundle is never modified: like ModelOpt's ``python -m modelopt.onnx.quantization``
and ONNX Runtime's ``quantize_static(model_input, model_output, ...)``, quantization reads one
model and writes another, so the fp32 bundle stays for comparison (``dvis-trt check
bundles/r50_int8 --against bundles/r50 VIDEO``) and for re-calibration. ``dvis-trt export
--precision int8 --calibration ...`` is the same in one step from a checkpoint.
"""
from __future__ import annotations

import argparse
import time

__all__ = ["add_arguments", "add_calibration_arguments", "run", "verdict_gate"]


#: the exit-status rule, shown under ``--help`` of ``quantize`` and ``export``
GATE_HELP = ("exit status: 1 when the int8 accuracy verdict against fp32 fails (the bundle and its "
             "accuracy.json are still written), 0 when it passes or with --no-report")


def add_calibration_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--calibration``, ``--calibration-frames``, ``--validation``, ``--quant-tool``,
    ``--no-report`` (shared by ``export`` and ``quantize``)."""
    from .quantize import DEFAULT_CALIBRATION_FRAMES, QUANT_TOOLS

    parser.add_argument("--calibration", nargs="+", required=required, default=None,
                        metavar="VIDEO_OR_FOLDER",
                        help="videos / frame folders whose frames calibrate the int8 "
                             "activation ranges (use footage like what you will deploy on)")
    parser.add_argument("--calibration-frames", type=int, default=DEFAULT_CALIBRATION_FRAMES,
                        metavar="N",
                        help="calibration frames in total, spread evenly over each video "
                             f"(default {DEFAULT_CALIBRATION_FRAMES})")
    parser.add_argument("--validation", nargs="+", default=None, metavar="VIDEO_OR_FOLDER",
                        help="videos for the accuracy report against fp32 (default: the "
                             "calibration videos)")
    parser.add_argument("--quant-tool", choices=QUANT_TOOLS, default="ort",
                        help="Q/DQ insertion and calibration: 'ort' ONNX Runtime's static "
                             "quantizer (default; fast in ORT CPU and accepted by TensorRT), "
                             "'modelopt' NVIDIA ModelOpt ONNX PTQ")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="REGEX",
                        help="also keep fp32 the Conv/MatMul nodes whose ONNX name matches one of "
                             "these regular expressions (e.g. 'pixel_decoder/' or 'backbone/res5'; "
                             "default: none beyond the built-in sensitive parts)")
    parser.add_argument("--reduce-range", action="store_true",
                        help="7-bit weights ([-64, 64]) for CPUs without VNNI (AVX2, AVX-512 "
                             "without VNNI: their int8 kernels saturate with full-range weights; "
                             "`grep -c vnni /proc/cpuinfo` is 0 there); costs precision where "
                             "VNNI or TensorRT runs the graph (default off)")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the accuracy report (accuracy.json) against fp32, and with it "
                             "the gate: without a report the exit status is 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt quantize``."""
    from dvis_trt.runtime.cli_args import add_main_argument

    parser.epilog = GATE_HELP

    add_main_argument(parser, "bundle", kind="bundle", metavar="BUNDLE", flags=("--bundle",),
                      accepts=("folder",), help="fp32 bundle folder (dvis-trt export)")
    parser.add_argument("--output", "-o", required=True, metavar="NEW_BUNDLE/",
                        help="folder of the int8 bundle (the input bundle is not modified)")
    add_calibration_arguments(parser, required=True)
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads for the accuracy report (default: all cores)")


def verdict_gate(report, root, command: str) -> int:
    """The exit status of an int8 export / quantize: 0 when ``report`` (an
    :class:`~dvis_trt.runtime.accuracy.AccuracyReport`, or None with ``--no-report``) passes,
    else 1 after one line on stderr saying the bundle at ``root`` was written anyway."""
    import sys

    if report is None or report.passed:
        return 0
    print(f"dvis-trt {command}: accuracy verdict FAIL against fp32 (exit 1); the int8 bundle was "
          f"still written to {root} with accuracy.json: inspect it, re-calibrate or --exclude "
          "more nodes before deploying", file=sys.stderr, flush=True)
    return 1


def run(args: argparse.Namespace) -> int:
    """Quantize; prints one line per step and the accuracy verdict. Returns 0 when the verdict
    passes (or with ``--no-report``), 1 when it fails -- the bundle is written either way
    (:func:`verdict_gate`)."""
    from dvis_trt.runtime.cli_args import resolve_main_arguments

    from .quantize import quantize_bundle

    resolve_main_arguments(args)
    t0 = time.perf_counter()
    manifest, report = quantize_bundle(
        args.bundle, args.output, args.calibration, num_frames=args.calibration_frames,
        tool=args.quant_tool, validation=args.validation, report=not args.no_report,
        threads=args.threads, exclude=args.exclude, reduce_range=args.reduce_range,
        progress=lambda line: print(line, flush=True))
    print(f"done in {time.perf_counter() - t0:.1f} s: int8 bundle in {manifest.root}")
    return verdict_gate(report, manifest.root, "quantize")
