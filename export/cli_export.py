"""``dvis-trt export``: checkpoint + config -> bundle of per-stage ONNX graphs.

Example::

    dvis-trt export DAQ_Offline_R50_OVIS.pth --config r50-ovis -o bundles/r50_ovis [--msda onnx]
    dvis-trt export model_final.pth --config my_configs/DAQ_Offline_R50.yaml -o bundle/
"""
from __future__ import annotations

import argparse
import re
import time

from dvis_trt.errors import InputError

__all__ = ["add_arguments", "run", "parse_size"]



from dvis_trt.runtime.validate import count  # noqa: E402

def parse_size(text: str) -> tuple:
    """``"480x864"`` -> ``(480, 864)`` (padded height x width). Raises InputError."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text or "")
    if not m:
        raise InputError(f"size {text!r} must look like HEIGHTxWIDTH, e.g. 480x864")
    from dvis_trt.runtime.validate import MAX_SIDE
    h, w = int(m.group(1)), int(m.group(2))
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise InputError(f"size {text!r}: each side must be 1..{MAX_SIDE} pixels")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt export``."""
    from dvis_trt.runtime.bundle import MSDA_MODES

    from dvis_trt.runtime.cli_args import add_main_argument

    add_main_argument(parser, "checkpoint", kind="checkpoint", metavar="CHECKPOINT",
                      flags=("--checkpoint",), related=("config_file",), accepts=("file",),
                      help="trained weights, .pth or detectron2 .pkl (official layout; loaded "
                           "strictly)")
    parser.add_argument("--config", "--config-file", dest="config_file", required=True,
                        metavar="NAME|CFG.yaml",
                        help="the model's config: a packaged name (see `dvis-trt configs`, e.g. "
                             "r50-ovis) or your official DVIS-DAQ offline YAML (_BASE_ chain "
                             "resolved)")
    parser.add_argument("--output", "-o", required=True, metavar="BUNDLE/",
                        help="bundle folder to write (an existing bundle is replaced atomically)")
    parser.add_argument("--msda", choices=MSDA_MODES, default="onnx",
                        help="MSDeformAttn export: 'onnx' pure ONNX (GridSample, runs anywhere), "
                             "'plugin' our custom node (TensorRT plugin / ORT CPU twin), "
                             "'trt-builtin' TensorRT's MultiscaleDeformableAttnPlugin_TRT "
                             "(default: onnx)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32",
                        help="precision the graphs say to run in (TensorRT builds strongly typed "
                             "networks): fp16/bf16 keep LayerNorm, Softmax, reductions, attention "
                             "logits and MSDA sampling coordinates in fp32; int8 adds explicit "
                             "Q/DQ to the segmenter's convolutions and linears, calibrated on "
                             "--calibration (default fp32)")
    parser.add_argument("--opset", type=int, default=17,
                        help="ONNX opset, 16..20 (default 17)")
    parser.add_argument("--window", type=count(1, 256), default=5, metavar="T",
                        help="frames of the example segmenter input used to trace (T stays "
                             "dynamic; default 5, the official window)")
    parser.add_argument("--example-size", default=None, metavar="HxW",
                        help="padded size of the example images (multiples of 32; default: "
                             "MIN_SIZE_TEST at 16:9, e.g. 480x864); H and W stay dynamic")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides (detectron2 style), recorded in the manifest")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random example inputs used to trace (default 0)")
    from .cli_quantize import GATE_HELP, add_calibration_arguments
    add_calibration_arguments(parser, required=False)
    parser.epilog = "with --precision int8, " + GATE_HELP
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="allow arbitrary pickled objects in the checkpoint (only for files "
                             "you trust)")


def run(args: argparse.Namespace) -> int:
    """Export; prints one line per stage and a summary. Returns 0, or 1 when an int8
    bundle's accuracy verdict fails (it is written all the same; ``cli_quantize.verdict_gate``);
    errors raise :class:`~dvis_trt.errors.DvisTrtError`, which the CLI prints as one line.

    ``--precision int8`` exports fp32 into a temporary bundle next to ``--output`` and
    quantizes it from there (:func:`dvis_trt.export.quantize.quantize_bundle`); fp16/bf16 with
    ``--validation`` (or ``--calibration``) also export that fp32 twin to write the accuracy
    report. The temporary fp32 bundle is removed at the end."""
    from .onnx_export import export_from_checkpoint
    from dvis_trt.runtime.cli_args import resolve_main_arguments

    resolve_main_arguments(args)
    from .named_configs import resolve_config

    config_path, named = resolve_config(args.config_file)
    print(f"config: {named.name + ' (' + str(config_path) + ')' if named else config_path}; "
          f"checkpoint: {args.checkpoint}", flush=True)
    size = parse_size(args.example_size) if args.example_size else None
    if args.precision == "int8" and not args.calibration:
        raise InputError("--precision int8 needs --calibration VIDEO_OR_FOLDER (frames to "
                         "calibrate the activation ranges on)")
    t0 = time.perf_counter()
    say = lambda line: print(line, flush=True)  # noqa: E731
    common = dict(msda=args.msda, opset=args.opset, window=args.window,
                  overrides=list(args.opts or []), example_size=size,
                  allow_unsafe_pickle=args.allow_unsafe_pickle, seed=args.seed, progress=say)
    videos = args.validation or args.calibration
    twin = args.precision == "int8" or (args.precision != "fp32" and videos
                                        and not args.no_report)
    acc = None  # the int8 accuracy report: its verdict is the exit status
    if not twin:
        manifest = export_from_checkpoint(args.config_file, args.checkpoint, args.output,
                                          precision=args.precision, **common)
    else:
        import os
        import shutil
        from pathlib import Path

        from dvis_trt.outputs import temp_path, write_marker

        out = Path(args.output).absolute()
        fp32_dir = temp_path(out.with_name(out.name + ".fp32"), keep_suffix=False)
        try:
            say("exporting the fp32 graphs first")
            export_from_checkpoint(args.config_file, args.checkpoint, fp32_dir, precision="fp32",
                                   **common)
            if args.precision == "int8":
                from .quantize import quantize_bundle
                manifest, acc = quantize_bundle(
                    fp32_dir, out, args.calibration, num_frames=args.calibration_frames,
                    tool=args.quant_tool, validation=args.validation,
                    report=not args.no_report, exclude=args.exclude,
                    reduce_range=args.reduce_range, progress=say)
            else:
                from dvis_trt.runtime.accuracy import REPORT_FILE, compare_bundles, write_report
                manifest = export_from_checkpoint(args.config_file, args.checkpoint, out,
                                                  precision=args.precision, **common)
                low = compare_bundles(out, fp32_dir, videos, progress=say)
                write_report(low, out / REPORT_FILE)
                write_marker(out, os.listdir(out))  # the report is ours too
                say(f"accuracy vs fp32: {low.verdict()}")
        finally:
            shutil.rmtree(fp32_dir, ignore_errors=True)
    total = sum((manifest.root / f).stat().st_size for s in manifest.stages.values()
                for f in (s.file, s.data_file) if f)  # external data included
    print(f"done in {time.perf_counter() - t0:.1f} s: {len(manifest.stages)} stages, "
          f"{total / 1e6:.1f} MB of ONNX in {manifest.root}")
    from .cli_quantize import verdict_gate
    return verdict_gate(acc, manifest.root, "export")
