"""``dvis-trt check``: run each stage of a bundle in a backend and in a reference on the same
inputs, and print max-abs / max-rel differences per output.

Default: backend ONNX Runtime, reference eager PyTorch (needs ``--checkpoint``; the config is
the manifest's ``config.source`` + ``producer.config_overrides`` unless ``--config-file`` is
given). ``--backend trt --reference ort`` compares TensorRT engines with ONNX Runtime (no torch,
no checkpoint needed).

Inputs come from :func:`dvis_trt.export.sample_inputs.sample_stage_inputs`: random images
through the *reference*'s segmenter, tracker_first, refiner, so every stage sees realistic
inputs and both sides see exactly the same arrays. ``tracker_step`` is checked once per
``--tracks`` value (0 = every track died, 1, many).

Metrics per output: ``max_abs = max |backend - reference|``; ``max_rel = max_abs / max
|reference|`` (relative to the output's scale, so near-zero entries do not blow it up). An output
passes when ``max_abs <= atol + rtol * max |reference|``; exit status 1 if any fails.

Backends come from the one registry, :func:`dvis_trt.runtime.backends.registry.create_backend`
(a new backend registered there is checkable here with no change).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import List, Optional, Sequence

import numpy as np

from dvis_trt.errors import InputError
from dvis_trt.fileio import atomic_write_json
from dvis_trt.runtime.backends.registry import BACKENDS as REGISTRY_BACKENDS
from dvis_trt.runtime.backends.registry import create_backend
from dvis_trt.runtime.bundle import load_constants

__all__ = ["add_arguments", "run", "BACKENDS", "CheckRow", "compare_stages",
           "diff_stats", "format_table", "DEFAULT_RTOL", "DEFAULT_ATOL"]

#: Backends ``check`` can compare (the registry's, less ``auto``).
BACKENDS = tuple(n for n in REGISTRY_BACKENDS if n != "auto")
#: Default pass criterion ``max_abs <= atol + rtol * max|ref|``. fp32 graphs that compute the
#: same function in another order differ by ~1e-6 of the output's scale per layer; the R50
#: segmenter stacks ~100 layers, so 1e-3 of the scale still flags any real divergence (a
#: wrong op or a baked shape gives O(1)). ``atol`` covers all-zero outputs.
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-5


@dataclasses.dataclass
class CheckRow:
    """One output of one stage run: shapes, the two metrics, the reference's scale, verdict."""

    stage: str
    case: str
    output: str
    shape: tuple
    max_abs: float
    max_rel: float
    ref_max: float
    ok: bool

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d



from dvis_trt.runtime.validate import count, number  # noqa: E402

def diff_stats(got: np.ndarray, ref: np.ndarray) -> tuple:
    """(max_abs, max_rel, ref_max) of two arrays of the same shape (zeros for empty ones).

    Raises ValueError on a shape mismatch; NaN / inf anywhere gives ``inf`` differences.
    """
    got = np.asarray(got)
    ref = np.asarray(ref)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} differs from the reference's {ref.shape}")
    if ref.size == 0:
        return 0.0, 0.0, 0.0
    a = got.astype(np.float64)
    b = ref.astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        same = np.array_equal(a, b, equal_nan=True)
        return (0.0, 0.0, float("inf")) if same else (float("inf"), float("inf"), float("inf"))
    max_abs = float(np.abs(a - b).max())
    ref_max = float(np.abs(b).max())
    return max_abs, (max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))), ref_max


def compare_stages(backend, reference, manifest, dims, *, tracks: Sequence[int] = (),
                   stages: Optional[Sequence[str]] = None, seed: int = 0,
                   rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                   progress=None) -> List[CheckRow]:
    """Run every stage in ``backend`` and ``reference`` (loaded :class:`Backend` objects) on
    the same sample inputs and return one :class:`CheckRow` per (stage run, output).

    Args:
        manifest: the bundle's loaded manifest (for the constants and N).
        dims: :class:`~dvis_trt.export.sample_inputs.SampleDims` (``dims.tracks`` is the first
            tracker_step case).
        tracks: further tQ values for extra tracker_step runs (``dims.tracks`` is always run).
        stages: subset of stages to compare (default: all; inputs are made with the reference
            regardless).
    Raises:
        InputError / BundleError from the backends; ValueError for bad dims.
    """
    from .sample_inputs import sample_stage_inputs, tracker_step_inputs

    constants = load_constants(manifest)
    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    inputs = sample_stage_inputs(reference.run, dims, constants,
                                 num_new_ins=manifest.config.num_new_ins, seed=seed)
    say(f"sample inputs through the reference in {time.perf_counter() - t0:.1f} s")
    cases = [(s, f"T={dims.frames} {dims.height}x{dims.width}" if s == "segmenter" else
              f"tQ={dims.tracks}" if s == "tracker_step" else
              f"L={dims.refiner_frames} Qr={inputs['refiner']['instance_embeds'].shape[1]}"
              if s == "refiner" else
              f"t={dims.mask_frames} Qs={dims.mask_queries}" if s == "mask_head" else "",
              inputs[s]) for s in inputs]
    if any(t != dims.tracks for t in tracks):
        first = reference.run("tracker_first", inputs["tracker_first"])
        frame = {k: inputs["tracker_step"][k] for k in ("frame_embeds", "mask_pooled",
                                                         "mask_features")}
        rng = np.random.default_rng(seed + 1)
        for t in tracks:
            if t != dims.tracks:
                cases.append(("tracker_step", f"tQ={t}",
                              tracker_step_inputs(first, frame, constants, int(t), rng)))
    rows: List[CheckRow] = []
    present = set(manifest.stages)  # bundles exported before an optional stage lack it
    for stage, case, feed in cases:
        if stage not in present or (stages is not None and stage not in stages):
            continue
        t1 = time.perf_counter()
        ref = reference.run(stage, feed)
        t2 = time.perf_counter()
        got = backend.run(stage, feed)
        t3 = time.perf_counter()
        say(f"{stage} [{case}]: reference {t2 - t1:.2f} s, backend {t3 - t2:.2f} s")
        for name, r in ref.items():
            g = got[name]
            try:
                max_abs, max_rel, ref_max = diff_stats(g, r)
            except ValueError as exc:
                raise InputError(f"stage '{stage}' output '{name}': {exc}") from None
            ok = max_abs <= atol + rtol * ref_max
            rows.append(CheckRow(stage, case, name, tuple(np.shape(r)), max_abs, max_rel,
                                 ref_max, bool(ok)))
    return rows


def format_table(rows: Sequence[CheckRow]) -> str:
    """A fixed-width text table of the rows."""
    head = ("stage", "case", "output", "shape", "max-abs", "max-rel", "max|ref|", "result")
    body = [(r.stage, r.case, r.output, "x".join(str(d) for d in r.shape) or "()",
             f"{r.max_abs:.3e}", f"{r.max_rel:.3e}", f"{r.ref_max:.3e}",
             "ok" if r.ok else "FAIL") for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt check``."""
    from dvis_trt.runtime.cli_args import add_main_argument

    add_main_argument(parser, "bundle", kind="bundle", metavar="BUNDLE", flags=("--bundle",),
                      related=("checkpoint",), accepts=("folder",),
                      help="bundle folder (dvis-trt export)")
    parser.add_argument("--against", nargs="+", metavar=("FP32_BUNDLE/", "VIDEO"),
                        default=None,
                        help="accuracy report of BUNDLE (int8/fp16/bf16) against the fp32 "
                             "bundle on one or more videos / frame folders: instances matched, "
                             "labels, mask IoU, scores, tracks, per-stage errors; exit 1 when "
                             "the verdict fails")
    parser.add_argument("--report", metavar="PATH", default=None,
                        help="with --against: also write the report as JSON")
    parser.add_argument("--checkpoint", metavar="model.pth",
                        help="weights of the eager side (default: the checkpoint the bundle's "
                             "manifest records, refused if the file changed since the export)")
    parser.add_argument("--config", "--config-file", dest="config_file", metavar="NAME|CFG.yaml",
                        help="config of the eager model, a name (`dvis-trt configs`) or a YAML "
                             "file (default: the one the bundle was exported with)")
    parser.add_argument("--opts", nargs="*", default=None, metavar="KEY=VALUE",
                        help="config overrides with --config-file (default: the manifest's)")
    parser.add_argument("--backend", default="ort", choices=sorted(BACKENDS),
                        help="backend under test (default: ort)")
    parser.add_argument("--reference", default="torch", choices=sorted(BACKENDS),
                        help="reference backend (default: torch, i.e. eager PyTorch)")
    parser.add_argument("--providers", default="auto",
                        help="ONNX Runtime providers, comma-separated (cpu, cuda, tensorrt; "
                             "default auto)")
    parser.add_argument("--threads", type=count(1, 4096), default=None, help="CPU threads per backend")
    parser.add_argument("--frames", type=count(1, 256), default=2, metavar="T",
                        help="segmenter window of the check (default 2)")
    parser.add_argument("--size", default=None, metavar="HxW",
                        help="padded image size, multiples of 32 (default: the config's "
                             "MIN_SIZE_TEST at 16:9)")
    parser.add_argument("--tracks", default="0,1,7", metavar="N[,N...]",
                        help="live-track counts tQ for tracker_step (default 0,1,7)")
    parser.add_argument("--refiner-frames", type=count(1, 10_000), default=6, metavar="L",
                        help="clip length L of the refiner check (default 6)")
    parser.add_argument("--refiner-queries", type=count(1, 10_000), default=None, metavar="Qr",
                        help="instance queries of the refiner check (default: NUM_NEW_INS)")
    parser.add_argument("--mask-frames", type=count(1, 256), default=3, metavar="t",
                        help="frames per mask-head call in the check (default 3)")
    parser.add_argument("--mask-queries", type=count(1, 10_000), default=None, metavar="Qs",
                        help="instances per mask-head call in the check (default: TEST.MAX_NUM)")
    parser.add_argument("--stages", nargs="*", default=None, help="only these stages")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random sample images (default 0)")
    parser.add_argument("--rtol", type=number(0.0, 1e6), default=DEFAULT_RTOL,
                        help=f"pass if max-abs <= atol + rtol * max|ref| (default {DEFAULT_RTOL})")
    parser.add_argument("--atol", type=number(0.0, 1e6), default=DEFAULT_ATOL,
                        help=f"absolute part of the pass criterion (default {DEFAULT_ATOL})")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the rows as JSON")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="allow arbitrary pickled objects in the checkpoint (only for files "
                             "you trust)")


def _backend_from_args(name: str, args: argparse.Namespace):
    if name == "ort":
        from dvis_trt.runtime.validate import clamp_threads
        return create_backend("ort", providers=args.providers, threads=clamp_threads(args.threads))
    if name == "torch":
        return create_backend("torch", checkpoint=args.checkpoint, config_file=args.config_file,
                              overrides=args.opts, threads=args.threads,
                              allow_unsafe_pickle=args.allow_unsafe_pickle)
    return create_backend(name)


def run_against(args: argparse.Namespace) -> int:
    """``check BUNDLE --against FP32_BUNDLE VIDEO...``: the accuracy report
    (:mod:`dvis_trt.runtime.accuracy`); prints it, returns 0 on PASS and 1 on FAIL."""
    from dvis_trt.runtime.accuracy import compare_bundles, write_report

    against, videos = args.against[0], args.against[1:]
    if not videos:
        raise InputError("check --against needs one or more videos to compare on: dvis-trt "
                         "check BUNDLE --against FP32_BUNDLE VIDEO [VIDEO ...]")
    report = compare_bundles(args.bundle, against, videos, threads=args.threads,
                             progress=lambda s: print(s, flush=True))
    print("per-stage relative error (max / mean |diff| over max |fp32|):")
    print("\n".join(report.stage_lines()))
    if args.report:
        write_report(report, args.report)
    print(report.verdict())
    return 0 if report.passed else 1


def run(args: argparse.Namespace) -> int:
    """Compare; print the table. Returns 0 when every output passes, 1 otherwise."""
    from dvis_trt.runtime.cli_args import resolve_main_arguments

    resolve_main_arguments(args)
    if args.against:
        return run_against(args)
    from dvis_trt.runtime.bundle import STAGE_NAMES, load_manifest

    from .cli_export import parse_size
    from .onnx_export import example_dims
    from .sample_inputs import SampleDims

    if args.json:  # the output-safety rule, before anything runs
        from dvis_trt.outputs import check_outputs
        check_outputs([("--json", args.json)],
                      [("the bundle", args.bundle), ("--checkpoint", args.checkpoint),
                       ("--config-file", args.config_file)])
    manifest = load_manifest(args.bundle)
    if "torch" in (args.backend, args.reference):
        from dvis_trt.runtime.provenance import recorded_checkpoint

        from .named_configs import eager_config_source
        if not args.checkpoint:  # the one the bundle was exported from (hash checked)
            args.checkpoint = str(recorded_checkpoint(
                manifest, needed_for="the torch side of the check"))
            print(f"eager model: {args.checkpoint} (recorded in the bundle)", flush=True)
        if args.config_file is None:
            args.config_file, recorded = eager_config_source(manifest)
            if args.opts is None:
                args.opts = recorded
    if args.stages:
        bad = [s for s in args.stages if s not in STAGE_NAMES]
        if bad:
            raise InputError(f"unknown stage(s) {bad}; stages are {', '.join(STAGE_NAMES)}")
    try:
        tracks = [int(x) for x in str(args.tracks).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--tracks {args.tracks!r} must be comma-separated integers") from None
    if not tracks or min(tracks) < 0:
        raise InputError(f"--tracks {args.tracks!r}: give one or more counts >= 0")
    values = manifest.config.to_dict()
    base = example_dims(values, window=max(1, args.frames),
                        size=parse_size(args.size) if args.size else None)
    dims = SampleDims(
        frames=args.frames, height=base.height, width=base.width, tracks=tracks[0],
        refiner_frames=args.refiner_frames,
        refiner_queries=args.refiner_queries or manifest.config.num_new_ins,
        mask_frames=args.mask_frames,
        mask_queries=args.mask_queries or min(manifest.config.max_num,
                                              args.refiner_queries or manifest.config.num_new_ins))
    try:
        dims.check()
    except ValueError as exc:
        raise InputError(str(exc)) from None

    backend = _backend_from_args(args.backend, args)
    reference = _backend_from_args(args.reference, args)
    try:
        t0 = time.perf_counter()
        for b in (reference, backend):
            b.load_all(manifest)
        print(f"loaded {args.backend} and {args.reference} in {time.perf_counter() - t0:.1f} s "
              f"(bundle {manifest.root}, msda={manifest.msda})", flush=True)
        rows = compare_stages(backend, reference, manifest, dims, tracks=tracks,
                              stages=args.stages, seed=args.seed, rtol=args.rtol,
                              atol=args.atol, progress=lambda s: print(s, flush=True))
    finally:
        backend.close()
        reference.close()
    print(f"\n{args.backend} vs {args.reference} (max-rel = max-abs / max|ref|; pass: max-abs <= "
          f"{args.atol:g} + {args.rtol:g} * max|ref|)")
    print(format_table(rows))
    if args.json:
        atomic_write_json(args.json, {"bundle": str(manifest.root), "backend": args.backend,
                                      "reference": args.reference, "rtol": args.rtol,
                                      "atol": args.atol, "rows": [r.to_dict() for r in rows]},
                          indent=2)
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(rows)} outputs exceed the tolerance")
        return 1
    print(f"all {len(rows)} outputs within tolerance")
    return 0
