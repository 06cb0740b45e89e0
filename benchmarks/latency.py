"""Per-frame latency of the online, near-online and offline modes side by side
(``dvis-trt bench --mode online|near-online``).

Method (one process, one backend, the video decoded once up front):

* **arrival** of frame k is the moment it is handed to the pipeline; the source is *saturated*:
  the next frame arrives as soon as the pipeline takes it (a source faster than inference —
  any camera on a CPU — with the ``block`` policy; with ``drop-oldest`` the frames in between
  would be dropped and the latency of the processed ones is the same);
* **result** of frame k is the moment the mode hands out its instances: online after the frame
  (segmenter, tracker step, the tracker's masks, RLE); near-online N when the clip holding the
  frame closes (segmenter + tracker for the clip's frames, refiner, masks); offline when the
  whole video is done (one clip);
* latency = result - arrival, per frame, pooled over ``repeats`` rounds -> p50 / p90 / p99;
  throughput = frames / wall time of a run (median over rounds);
* rounds alternate the order of the modes (A B C, C B A, ...) against drift on a noisy machine;
  one short untimed warm-up run of every mode first.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["LatencyRow", "parse_modes", "bench_latency", "latency_markdown", "run_cli"]


@dataclass
class LatencyRow:
    mode: str                       # "online", "near-online N=5", "offline"
    frames: int
    latencies: List[float] = field(default_factory=list)
    walls: List[float] = field(default_factory=list)

    def summary(self) -> Dict[str, object]:
        lat = np.asarray(self.latencies) * 1e3
        fps = [self.frames / w for w in self.walls]
        return {"mode": self.mode, "frames": self.frames, "runs": len(self.walls),
                "latency_ms_p50": float(np.percentile(lat, 50)),
                "latency_ms_p90": float(np.percentile(lat, 90)),
                "latency_ms_p99": float(np.percentile(lat, 99)),
                "latency_ms_max": float(lat.max()),
                "throughput_fps_median": float(np.median(fps)),
                "throughput_fps_min": float(min(fps)), "throughput_fps_max": float(max(fps))}


def parse_modes(mode: str, clip_frames: Sequence[int]) -> List[str]:
    """The modes to time for ``--mode``: the asked one(s) and offline beside them."""
    if mode == "online":
        return ["online", "offline"]
    if mode == "near-online":
        return [f"near-online:{n}" for n in clip_frames] + ["offline"]
    if mode == "all":
        return ["online"] + [f"near-online:{n}" for n in clip_frames] + ["offline"]
    raise ValueError(f"unknown latency mode {mode!r}")


def _run_mode(mode: str, runner, pipes: Dict[str, object], frames) -> tuple:
    """One run of ``mode`` over ``frames``: (latency per frame in s, wall s)."""
    t_start = time.monotonic()
    if mode == "online":
        pipe = pipes[mode]
        pipe.reset()
        lat = []
        for rgb in frames:
            r = pipe.process(rgb, arrival=time.monotonic())
            lat.append(r.done - r.arrival)
    elif mode.startswith("near-online:"):
        pipe = pipes[mode]
        pipe.reset()
        lat = []
        for rgb in frames:
            for r in pipe.push(rgb, arrival=time.monotonic()):
                lat.append(r.done - r.arrival)
        for r in pipe.flush():
            lat.append(r.done - r.arrival)
    else:  # offline: the whole video as one clip
        arrivals = []

        def feed():
            for rgb in frames:
                arrivals.append(time.monotonic())
                yield rgb

        runner.pipeline.run_video(feed(), clip_frames=None)
        done = time.monotonic()
        lat = [done - a for a in arrivals]
    return lat, time.monotonic() - t_start


def bench_latency(bundle, frames: Sequence[np.ndarray], modes: Sequence[str], *,
                  backend: str = "ort", threads: Optional[int] = None, repeats: int = 2,
                  warmup_frames: int = 2, say=print) -> List[LatencyRow]:
    """Time ``modes`` (``online``, ``near-online:N``, ``offline``) on ``frames`` (RGB uint8);
    see the module docstring. Returns one :class:`LatencyRow` per mode."""
    from dvis_trt.runtime.bundle import load_manifest
    from dvis_trt.runtime.online import NearOnlinePipeline, OnlinePipeline
    from dvis_trt.runtime.runner import Runner

    manifest = load_manifest(bundle, require_stages=())
    runner = Runner(manifest, backend, threads=threads, quiet=True)
    try:
        consts = {"bg_slots": runner.pipeline.bg_slots,
                  "seg_query_feat": runner.pipeline.seg_query_feat}
        pipes: Dict[str, object] = {}
        for m in modes:
            if m == "online":
                pipes[m] = OnlinePipeline(runner.backend, runner.settings, consts,
                                          upsampler=runner.pipeline.upsampler)
            elif m.startswith("near-online:"):
                pipes[m] = NearOnlinePipeline(runner.backend, runner.settings, consts,
                                              clip_frames=int(m.split(":")[1]),
                                              upsampler=runner.pipeline.upsampler)
        say(f"backend: {runner.backend_desc}")
        for m in modes:  # warm-up: sessions, allocators, the first tracker call
            _run_mode(m, runner, pipes, frames[:warmup_frames])
        rows = {m: LatencyRow(m.replace(":", " N="), len(frames)) for m in modes}
        for r in range(repeats):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for m in order:
                time.sleep(0.2)  # ORT threads spin briefly after a call
                stage0 = dict(pipes[m].timings) if m in pipes else dict(runner.pipeline.timings)
                lat, wall = _run_mode(m, runner, pipes, frames)
                stage1 = pipes[m].timings if m in pipes else runner.pipeline.timings
                engine = {k: v - stage0.get(k, 0.0) for k, v in stage1.items()
                          if v - stage0.get(k, 0.0) > 0}
                rows[m].latencies.extend(lat)
                rows[m].walls.append(wall)
                s = rows[m].summary()
                say(f"round {r + 1} {rows[m].mode}: {wall:.1f} s, latency p50 "
                    f"{np.percentile(lat, 50) * 1e3:.0f} ms, max {max(lat) * 1e3:.0f} ms "
                    f"(pooled p50 {s['latency_ms_p50']:.0f} ms); engine s: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in engine.items())
                    + f"; host {wall - sum(engine.values()):.1f}")
        return [rows[m] for m in modes]
    finally:
        runner.close()


def latency_markdown(rows: Sequence[LatencyRow], title: str = "") -> str:
    lines = [title, "", "| mode | latency p50 | p90 | p99 | throughput (frames/s), median (min–max) |",
             "|---|---|---|---|---|"] if title else \
        ["| mode | latency p50 | p90 | p99 | throughput (frames/s), median (min–max) |",
         "|---|---|---|---|---|"]
    for row in rows:
        s = row.summary()
        lines.append(f"| {s['mode']} | {s['latency_ms_p50'] / 1e3:.2f} s | "
                     f"{s['latency_ms_p90'] / 1e3:.2f} s | {s['latency_ms_p99'] / 1e3:.2f} s | "
                     f"{s['throughput_fps_median']:.3f} ({s['throughput_fps_min']:.3f}–"
                     f"{s['throughput_fps_max']:.3f}) |")
    return "\n".join(lines) + "\n"


def run_cli(args) -> int:
    """``dvis-trt bench --mode online|near-online|all``: writes OUT/latency.json and
    OUT/latency.md, prints the table."""
    from dvis_trt.errors import InputError
    from dvis_trt.runtime.video import open_source

    bundles, video = list(args.bundle or []), args.video   # resolved by cli_bench.run
    if len(bundles) != 1 or not video:
        raise InputError("bench --mode online/near-online needs one bundle and one video: "
                         "dvis-trt bench BUNDLE VIDEO --mode online")
    backend = (args.backends or "ort").split(",")[0]
    if backend == "torch":
        backend = "ort"
    clip = [int(x) for x in str(args.clip_frames).split(",") if x.strip()]
    if any(n < 1 for n in clip) or not clip:
        raise InputError(f"--clip-frames {args.clip_frames!r}: give sizes >= 1, e.g. 5,15")
    frames = [f.rgb for f in open_source(video).iter_frames()]
    if args.frames:
        frames = frames[:args.frames]
    say = (lambda *_: None) if args.quiet else print
    modes = parse_modes(args.mode, clip)
    rows = bench_latency(bundles[0], frames, modes, backend=backend, threads=args.threads,
                         repeats=args.repeats, say=say)
    out = Path(args.out)
    from dvis_trt.outputs import check_outputs
    check_outputs([("--out", out)], [("BUNDLE", bundles[0]), ("VIDEO", video)],
                  folders=("--out",))
    out.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    title = (f"Latency, {len(frames)} frames of {h}x{w}, backend {backend}, threads "
             f"{args.threads or 'all'}, {args.repeats} rounds (frame arrival -> result)")
    md = latency_markdown(rows, title)
    from dvis_trt.fileio import atomic_write_text
    atomic_write_text(out / "latency.md", md)
    atomic_write_text(out / "latency.json", json.dumps(
        {"schema": "dvis-trt-latency/1", "video": str(video), "bundle": str(bundles[0]),
         "frames": len(frames), "size": [h, w], "backend": backend, "threads": args.threads,
         "repeats": args.repeats, "rows": [r.summary() for r in rows]}, indent=1))
    print(md)
    return 0
