"""``dvis-trt quantize``: an int8 copy of an fp32 bundle, calibrated on your video(s).

Example::

    dvis-trt quantize bundles/r50 --calibration clips/ --calibration-frames 32 \\
        --output bundles/r50_int8

The input bundle is never modified: like ModelOpt's ``python -m modelopt.onnx.quantization``
and ONNX Runtime's ``quantize_static(model_input, model_output, ...)``, quantization reads one
model and writes another, so the fp32 bundle stays for comparison (``dvis-trt check
bundles/r50_int8 --against bundles/r50 VIDEO``) and for re-calibration. ``dvis-trt export
--precision int8 --calibration ...`` is the same in one step from a checkpoint.
"""
from __future__ import annotations

import argparse
import time

__all__ = ["add_arguments", "add_calibration_arguments", "run"]


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
    parser.add_argument("--no-report", action="store_true",
                        help="skip the accuracy report (accuracy.json) against fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt quantize``."""
    from dvis_trt.runtime.cli_args import add_main_argument

    add_main_argument(parser, "bundle", kind="bundle", metavar="BUNDLE", flags=("--bundle",),
                      accepts=("folder",), help="fp32 bundle folder (dvis-trt export)")
    parser.add_argument("--output", "-o", required=True, metavar="NEW_BUNDLE/",
                        help="folder of the int8 bundle (the input bundle is not modified)")
    add_calibration_arguments(parser, required=True)
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads for the accuracy report (default: all cores)")


def run(args: argparse.Namespace) -> int:
    """Quantize; prints one line per step and the accuracy verdict. Returns 0 (the bundle is
    written even when the verdict fails: the report says so; ``dvis-trt check --against``
    is the gate)."""
    from dvis_trt.runtime.cli_args import resolve_main_arguments

    from .quantize import quantize_bundle

    resolve_main_arguments(args)
    t0 = time.perf_counter()
    manifest, report = quantize_bundle(
        args.bundle, args.output, args.calibration, num_frames=args.calibration_frames,
        tool=args.quant_tool, validation=args.validation, report=not args.no_report,
        threads=args.threads, exclude=args.exclude, progress=lambda line: print(line, flush=True))
    print(f"done in {time.perf_counter() - t0:.1f} s: int8 bundle in {manifest.root}")
    return 0
