"""``dvis-trt demo``: the whole chain on real files, with random weights.

1. a seeded random-init checkpoint in the official layout (``{"model": state_dict}``, the
   official key names; the random init is rescaled by
   :func:`dvis_trt.export.testing.spread_weights_` so queries, masks and tracks spread instead of
   collapsing onto one),
2. ``dvis-trt export`` of it into a bundle of per-stage ONNX graphs,
3. a real MP4 (H.264, odd size 333x501, moving textured objects; :mod:`dvis_trt.runtime.synthetic`),
4. ``dvis-trt run`` on ONNX Runtime CPU: ``results.json`` (YouTube-VIS format) and an overlay
   video.

Default ``--config tiny`` (reduced widths, finishes in well under a minute on a laptop CPU);
``--config r50`` builds the real R50 OVIS architecture (export takes minutes on a CPU).
Needs the export extra (torch) for steps 1-2; step 4 alone is what an edge install runs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from dvis_trt.runtime.cli import positive_int as _positive

__all__ = ["add_arguments", "run", "CONFIGS", "DISCLAIMER"]

#: ``--config`` choices -> packaged config file name.
CONFIGS = {"tiny": "tiny.yaml", "r50": "dvis_daq_offline_r50_ovis.yaml",
           "r50-ovis": "dvis_daq_offline_r50_ovis.yaml", "tiny-vit": "tiny_vit.yaml",
           "vitl-ovis": "dvis_daq_offline_vitl_ovis.yaml"}
#: :func:`~dvis_trt.export.testing.spread_weights_` settings per config. The defaults were tuned
#: on the tiny config; at R50 widths they let the tracker validate almost every new-instance
#: query (~100 births per frame), so the R50 demo adds more "no object" bias (same values as
#: ``benchmarks/host_overhead.py``'s R50 bundle: ~30-60 live tracks, births and kick-outs).
SPREAD = {"tiny": {}, "r50": {"no_object_bias": 13.0, "tracker_no_object_bias": 15.0}}
SPREAD["r50-ovis"] = SPREAD["r50"]
SPREAD["tiny-vit"] = {}
SPREAD["vitl-ovis"] = SPREAD["r50"]

DISCLAIMER = (
    "NOTE: these weights are RANDOM (seeded, rescaled so that queries spread). The masks, "
    "classes and scores above mean nothing; the demo shows that the whole chain runs on real "
    "files. With a trained checkpoint:\n"
    "  dvis-trt export model_final.pth --config r50-ovis -o bundle/   "
    "(names: dvis-trt configs; or --config your_official_config.yaml)\n"
    "  dvis-trt run bundle/ your_video.mp4 -o results.json --overlay overlay.mp4")

def default_demo_dir(config: str, seed: int) -> Path:
    """``<user cache>/dvis_trt/demo/<config>-seed<seed>``; the cache is ``$DVIS_TRT_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/dvis_trt``, else ``~/.cache/dvis_trt`` (as the plugin builds')."""
    from dvis_trt.fileio import user_cache_dir

    return user_cache_dir() / "demo" / f"{config}-seed{seed}"




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt demo``."""
    parser.add_argument("--out", "--output-dir", dest="output_dir", default=None, metavar="DIR",
                        help="folder for the checkpoint, bundle, video, results and overlay "
                             "(default: <user cache>/dvis_trt/demo/<config>-seed<seed>, printed "
                             "first); a folder the demo did not make must be empty")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny",
                        help="tiny: reduced model, seconds (default); tiny-vit: reduced "
                             "ViT-Adapter model; r50 (= r50-ovis) / vitl-ovis: the R50 / "
                             "ViT-Adapter-L OVIS architecture, minutes (vitl-ovis: tens of "
                             "minutes) on a CPU")
    parser.add_argument("--contact-sheet", default=None, metavar="PNG",
                        help="also write a grid of overlay frames to this PNG (default: "
                             "contact_sheet.png in the demo folder)")
    parser.add_argument("--frames", type=_positive, default=24, metavar="N",
                        help="frames of the demo video (default 24)")
    parser.add_argument("--seed", type=int, default=6,
                        help="seed of the weights and the video (default 6)")
    parser.add_argument("--threads", type=_positive, default=None, metavar="N",
                        help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--quiet", "-q", action="store_true", help="only the final summary")


def run(args: argparse.Namespace) -> int:
    """Build everything and run it; prints what it did, the summary, the paths and the
    random-weights disclaimer. Returns 0."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # runtime/ never imports torch itself
        from dvis_trt.errors import DependencyError
        raise DependencyError("'dvis-trt demo' builds its bundle with PyTorch, which is not "
                              "installed; pip install 'dvis-trt[export]' (running an existing "
                              "bundle with `dvis-trt run` needs no torch)") from None
    from dvis_trt.export.checkpoint import write_random_checkpoint
    from dvis_trt.export.model.build import build_model
    from dvis_trt.export.onnx_export import export_from_checkpoint
    from dvis_trt.export.testing import spread_weights_

    from dvis_trt.export.config import load_config
    from dvis_trt.runtime.inputs import discover_inputs
    from dvis_trt.runtime.runner import Runner, run_videos
    from dvis_trt.runtime.synthetic import make_demo_video

    out = (Path(args.output_dir) if args.output_dir else
           default_demo_dir(args.config, args.seed)).expanduser().absolute()
    from dvis_trt.outputs import owned_entries, write_marker
    owned_entries(out, label="--out")   # new, empty, or a demo folder of ours
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, [f"random_{args.config}_seed{args.seed}.pth", f"bundle_{args.config}",
                       "demo.mp4", "results.json", "overlay.mp4", "contact_sheet.png"],
                 kind="demo")
    quiet = bool(args.quiet)
    print(f"demo folder: {out}", flush=True)

    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    t_all = time.perf_counter()
    config_file = Path(__file__).resolve().parent / "configs" / CONFIGS[args.config]
    cfg = load_config(config_file)

    t0 = time.perf_counter()
    ckpt = out / f"random_{args.config}_seed{args.seed}.pth"

    def factory():  # runs under torch.manual_seed(seed) (write_random_checkpoint)
        return spread_weights_(build_model(cfg), seed=args.seed, **SPREAD[args.config]).eval()

    write_random_checkpoint(factory, ckpt, args.seed)
    say(f"1/4 random-init checkpoint (official layout, seed {args.seed}): {ckpt} "
        f"({ckpt.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    bundle = out / f"bundle_{args.config}"
    say(f"2/4 exporting config {'tiny' if args.config == 'tiny' else 'r50-ovis'} "
        f"({config_file.name}) to ONNX (one graph per stage)...")
    export_from_checkpoint("tiny" if args.config == "tiny" else "r50-ovis", ckpt, bundle,
                           progress=(lambda line: say(f"    {line}")))
    say(f"    bundle: {bundle} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    video = out / "demo.mp4"
    demo = make_demo_video(video, num_frames=args.frames, size=(333, 501), seed=args.seed)
    h, w = demo.frames.shape[1:3]
    say(f"3/4 demo video: {video} ({demo.frames.shape[0]} frames, {h}x{w}, {demo.codec} "
        f"{demo.pix_fmt}, {len(demo.object_kinds)} moving textured objects, "
        f"{time.perf_counter() - t0:.1f} s)")

    say("4/4 running it on ONNX Runtime (CPU):")
    results = out / "results.json"
    overlay = out / "overlay.mp4"
    sheet = Path(args.contact_sheet).absolute() if args.contact_sheet else \
        out / "contact_sheet.png"
    jobs, _ = discover_inputs([video])
    with Runner(bundle, "ort", providers="cpu", threads=args.threads, quiet=quiet) as runner:
        summary = run_videos(runner, jobs, results, overlay, contact_sheet=sheet)
    o = summary.outcomes[0]
    print(f"demo done in {time.perf_counter() - t_all:.1f} s: {o.result.num_frames} frames, "
          f"{o.result.num_tracks} tracks born, {len(o.results)} instances, "
          f"{o.fps:.1f} frames/s on {summary.backend.split(' [')[0]}")
    print(f"  checkpoint: {ckpt}\n  bundle:     {bundle}\n  video:      {video}\n"
          f"  results:    {results}\n  overlay:    {overlay}\n  contact sheet: {sheet}")
    print(DISCLAIMER)
    return summary.exit_code
