"""The runtime's own per-frame work, with the engines taken out: is the host the bottleneck?

    python benchmarks/host_overhead.py [--frames 60] [--tracks 40] [--size 360x640]
        [--threads 2] [--json host_overhead.json]
    python benchmarks/host_overhead.py --bundle BUNDLE [--video v.mp4] ...   # real engines too

Mode 1 (default): the R50 OVIS offline config's shapes (Q = 100 queries, C = 256, K = 25,
N = 100 new-instance queries, S = 5 slots, MAX_NUM = 20, OFFLINE_TOPK_NUM = 40) at 360p
(360x640 -> 480x853, padded 480x864, mask features 120x216) through
:class:`~dvis_trt.runtime.pipeline.OfflinePipeline` on a *stub backend* that returns outputs
of the right shapes instantly (prebuilt arrays) and steers the tracker to keep ~``--tracks``
live tracks: a few are born every frame, some stop being valid and are kicked out after 8
misses. Everything the runtime does between engines is real: preprocessing (Pillow resize,
normalise, pad), the slot branch's Hungarian match (scipy) every frame, validity, the track
hub (append / invalid counts / kick-out / similarity-guided position embeds), noise filter and
top-K, the frame-by-frame Hungarian link for the fill queries, top-MAX_NUM, mask resize to the
original size (ONNX Runtime Resize) and RLE (pycocotools). Phases are timed through the
pipeline's tracing hook (a :class:`~dvis_trt.runtime.tracing.SpanTimer`, thread CPU time too;
nothing is patched); time inside the stub backend is excluded.

Mode 2 (``--bundle``): the same pipeline on the bundle's real ONNX Runtime engines and a real
video (default: a 360p demo MP4), reporting engine time per stage, host time and frames/s —
the end-to-end FPS and the host's share of it.

Prints a table and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from dvis_trt.runtime.preprocess import ResizeGeometry
from dvis_trt.runtime.tracing import SpanTimer

R50_CONFIG = Path(__file__).resolve().parents[1] / "export" / "configs" / \
    "dvis_daq_offline_r50_ovis.yaml"


class StubBackend:
    """Instant stage outputs with the bundle's shapes; steers the tracker's validity.

    Track identity travels in the embeds: channel 0 of a track query holds its stub id, so
    the stub knows which live tracks it has decided to let die (invalid from then on).
    """

    name = "stub"
    device_resident = False

    def __init__(self, q: int, c: int, k: int, n: int, d: int, target_tracks: int,
                 seed: int = 0, die_rate: float = 0.03, births_extra: float = 0.3):
        self.q, self.c, self.k, self.n, self.d = q, c, k, n, d
        self.target = target_tracks
        self.rng = np.random.default_rng(seed)
        self.die_rate, self.births_extra = die_rate, births_extra
        self.next_id = 1
        self.dying: set = set()
        self._mf: Dict[tuple, np.ndarray] = {}
        self._masks: Dict[tuple, np.ndarray] = {}
        self.hi = np.full(k + 1, -4.0, np.float32)
        self.hi[0] = 4.0                                   # a confident foreground class
        self.lo = np.full(k + 1, -4.0, np.float32)
        self.lo[-1] = 6.0                                  # "no object"
        self.live_counts = []

    # helpers -------------------------------------------------------------------------------
    def _embeds(self, rows: int, ids: np.ndarray) -> np.ndarray:
        e = self.rng.standard_normal((rows, self.c), dtype=np.float32)
        e[:, 0] = ids
        return e

    def _mask_features(self, t: int, h: int, w: int) -> np.ndarray:
        key = (t, h, w)
        if key not in self._mf:
            self._mf[key] = self.rng.standard_normal((t, self.d, h, w), dtype=np.float32)
        return self._mf[key]

    def _mask_logits(self, s: int, t: int, h: int, w: int) -> np.ndarray:
        """Blob-shaped mask logits (smooth fields; ~10-30% of the frame positive)."""
        key = (s, t, h, w)
        if key not in self._masks:
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            out = np.empty((s, t, h, w), np.float32)
            for i in range(s):
                cy, cx = self.rng.uniform(0.2, 0.8) * h, self.rng.uniform(0.2, 0.8) * w
                ry, rx = self.rng.uniform(0.1, 0.3) * h, self.rng.uniform(0.1, 0.3) * w
                for j in range(t):
                    out[i, j] = 1.0 - ((yy - cy - 2 * j) / ry) ** 2 - ((xx - cx - 3 * j) / rx) ** 2
            self._masks[key] = out
        return self._masks[key]

    # Backend API ---------------------------------------------------------------------------
    def run_resident(self, stage, inputs, fetch=()):
        return self.run(stage, inputs)

    def to_host(self, x):
        return x

    def run(self, stage, inputs):
        q, c, k, n = self.q, self.c, self.k, self.n
        if stage == "segmenter":
            t, _, hp, wp = inputs["images"].shape
            logits = np.where(self.rng.random((t, q, 1)) < 0.4, self.hi, self.lo).astype(np.float32)
            return {"mask_features": self._mask_features(t, hp // 4, wp // 4),
                    "frame_embeds": self.rng.standard_normal((t, q, c), dtype=np.float32),
                    "pred_logits": logits,
                    "mask_pooled": self.rng.standard_normal((t, q, c), dtype=np.float32)}
        if stage == "tracker_first":
            births = min(self.target, q)
            ids = np.zeros(q, np.float32)
            ids[:births] = np.arange(self.next_id, self.next_id + births)
            self.next_id += births
            logits = np.tile(self.lo, (q, 1))
            logits[:births] = self.hi
            return {"embeds": self._embeds(q, ids), "pred_logits": logits,
                    "track_pos": self.rng.standard_normal((q, c), dtype=np.float32)}
        if stage == "tracker_step":
            tq = inputs["track_queries"].shape[0]
            self.live_counts.append(tq)
            live_ids = inputs["track_queries"][:, 0].astype(np.int64)
            for i in live_ids:
                if self.rng.random() < self.die_rate:
                    self.dying.add(int(i))
            live_valid = np.array([int(i) not in self.dying for i in live_ids], bool)
            live_valid &= self.rng.random(tq) > 0.05          # occasional misses (revivals)
            births = max(0, self.target - tq) + int(self.rng.random() < self.births_extra)
            births = min(births, n)
            ids = np.zeros(tq + n, np.float32)
            ids[:tq] = live_ids
            ids[tq:tq + births] = np.arange(self.next_id, self.next_id + births)
            self.next_id += births
            valid = np.concatenate([live_valid, np.arange(n) < births])
            logits = np.where(valid[:, None], self.hi, self.lo).astype(np.float32)
            return {"embeds": self._embeds(tq + n, ids), "pred_logits": logits,
                    "slot_logits": np.tile(self.hi, (tq, 1)),
                    "track_pos_out": self.rng.standard_normal((tq + n, c), dtype=np.float32)}
        if stage == "refiner":
            l_len, qr, _ = inputs["instance_embeds"].shape
            return {"pred_logits": self.rng.standard_normal((qr, k + 1), dtype=np.float32) * 3,
                    "mask_embed": self.rng.standard_normal((l_len, qr, self.d), dtype=np.float32)}
        if stage == "mask_head":
            t, s, _ = inputs["mask_embed"].shape
            _, _, h, w = inputs["mask_features"].shape
            return {"pred_masks": self._mask_logits(s, t, h, w)}
        raise KeyError(stage)

    def close(self):
        pass


#: pipeline span (dvis_trt.runtime.tracing) -> phase row of this benchmark
PHASES = {"preprocess.resize": "preprocess", "preprocess.normalize": "preprocess",
          "tracker.match": "hungarian (slot match)", "tracker.hub_update": "track hub update",
          "tracker.scores": "scores / validity", "select.noise_filter": "noise filter + grouping",
          "select.link": "hungarian (frame link)", "select.topk": "top-K", "finalize.rle": "RLE",
          "finalize.mask_resize": "mask resize (ORT)"}


def _phases(timer) -> tuple:
    """(wall seconds, thread-CPU seconds) per phase row from a SpanTimer of one run."""
    wall: Dict[str, float] = {}
    cpu: Dict[str, float] = {}
    for span, phase in PHASES.items():
        if span in timer.totals:
            wall[phase] = wall.get(phase, 0.0) + timer.totals[span]
            cpu[phase] = cpu.get(phase, 0.0) + timer.cpu.get(span, 0.0)
    return wall, cpu


def _parse_size(text: str):
    h, w = text.lower().split("x")
    return int(h), int(w)


def stub_run(frames: int, tracks: int, size, threads: int, seed: int = 0,
             blas_threads: Optional[int] = 1, repeat: int = 3) -> dict:
    from dvis_trt.runtime import pipeline as pl
    from dvis_trt.export.config import inference_config, inference_values, load_config
    from dvis_trt.runtime.postprocess import MaskUpsampler
    from dvis_trt.runtime.runner import limit_blas_threads

    if blas_threads is not None:
        limit_blas_threads(blas_threads)  # what the Runner does
    values = inference_values(load_config(R50_CONFIG))
    settings = inference_config(load_config(R50_CONFIG))
    q, c, k, n = values["num_queries"], values["hidden_dim"], values["num_classes"], \
        values["num_new_ins"]
    d, s = values["mask_dim"], values["num_slots"]
    rng = np.random.default_rng(seed)
    constants = {"bg_slots": rng.standard_normal((s, c), dtype=np.float32),
                 "seg_query_feat": rng.standard_normal((q, c), dtype=np.float32)}
    backend = StubBackend(q, c, k, n, d, tracks, seed=seed)
    upsampler = MaskUpsampler(intra_op_threads=threads)
    video = [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8) for _ in range(frames)]
    pipe = pl.OfflinePipeline(backend, settings, constants, window=5, upsampler=upsampler)
    # warm-up (ORT resize session, scipy, allocations) on a short clip
    pipe.run_video(video[:6])
    own_keys = ("hungarian (slot match)", "track hub update", "scores / validity",
                "noise filter + grouping", "hungarian (frame link)", "top-K", "RLE")
    runs = []
    for _ in range(max(1, repeat)):
        pipe.timings.clear()
        backend.live_counts.clear()
        pipe.tracer = SpanTimer(cpu=True)   # the pipeline's tracing hook, no patching
        t0 = time.perf_counter()
        res = pipe.run_video(video)
        wall = time.perf_counter() - t0
        stub = sum(pipe.timings.values())
        seconds, cpu_s = _phases(pipe.tracer)
        phases = {k2: v / frames * 1e3 for k2, v in seconds.items()}
        cpu = {k2: v / frames * 1e3 for k2, v in cpu_s.items()}
        runs.append({"host": (wall - stub) / frames * 1e3, "stub": stub / frames * 1e3,
                     "phases": phases, "cpu": cpu,
                     "own": sum(phases.get(k2, 0.0) for k2 in own_keys),
                     "own_cpu": sum(cpu.get(k2, 0.0) for k2 in own_keys)})
    best = min(runs, key=lambda r: r["own"])   # the least disturbed run (shared machine)
    med = sorted(runs, key=lambda r: r["own"])[len(runs) // 2]
    lc = backend.live_counts
    return {
        "mode": "stub engines",
        "config": str(R50_CONFIG.name), "frames": frames, "size": list(size),
        "padded": list(ResizeGeometry.of(size[0], size[1], settings).padded),
        "threads": threads, "host_blas_threads": blas_threads, "repeats": len(runs),
        "live_tracks_mean": float(np.mean(lc)) if lc else 0.0,
        "live_tracks_max": int(max(lc)) if lc else 0, "tracks_born": int(res.num_tracks),
        "instances": int(len(res.scores)),
        "host_ms_per_frame": best["host"],
        "own_work_ms_per_frame": best["own"],
        "own_work_ms_per_frame_median": med["own"],
        "own_work_cpu_ms_per_frame": best["own_cpu"],
        "phases_ms_per_frame": dict(sorted(best["phases"].items(), key=lambda x: -x[1])),
        "phases_cpu_ms_per_frame": dict(sorted(best["cpu"].items(), key=lambda x: -x[1])),
        "other_python_ms_per_frame": best["host"] - sum(best["phases"].values()),
        "stub_engine_ms_per_frame": best["stub"],
    }


def engine_run(bundle: str, video: Optional[str], frames: int, size, threads: int,
               window: int) -> dict:
    """The real bundle on ONNX Runtime CPU: per-stage engine time, host time, frames/s."""
    from dvis_trt.runtime.inputs import discover_inputs
    from dvis_trt.runtime.runner import Runner

    if video is None:
        from dvis_trt.runtime.synthetic import make_demo_video
        video = os.path.join(os.path.dirname(os.path.abspath(bundle)),
                             f"bench_{size[0]}x{size[1]}_{frames}.mp4")
        if not os.path.isfile(video):
            make_demo_video(video, num_frames=frames, size=size, seed=0)
    runner = Runner(bundle, "ort", providers="cpu", threads=threads, window=window, quiet=True)
    (job,), _ = discover_inputs([video])
    src = job.open()
    # warm-up: first runs of every session (allocations, ORT kernel choice) are not timed
    runner.pipeline.run_video(f.rgb for _, f in zip(range(min(window + 1, 6)), src.iter_frames()))
    runner.pipeline.timings.clear()
    runner.pipeline.tracer = SpanTimer(cpu=True)
    t0 = time.perf_counter()
    out = runner.run_source(job, src)
    wall = time.perf_counter() - t0
    seconds, _ = _phases(runner.pipeline.tracer)
    n = out.result.num_frames
    eng = dict(runner.pipeline.timings)
    host = wall - sum(eng.values())
    runner.close()
    return {
        "mode": "ONNX Runtime CPU engines", "bundle": str(bundle), "video": str(video),
        "frames": n, "size": list(out.result.image_size), "threads": threads, "window": window,
        "fps": n / wall, "wall_s": wall, "tracks_born": int(out.result.num_tracks),
        "engine_ms_per_frame": {k: v / n * 1e3 for k, v in eng.items()},
        "engine_share": sum(eng.values()) / wall,
        "host_ms_per_frame": host / n * 1e3,
        "phases_ms_per_frame": {k: v / n * 1e3 for k, v in
                                sorted(seconds.items(), key=lambda x: -x[1])},
    }


#: Spread-weight biases for the R50 benchmark bundle (``--make-r50-bundle``): with the tiny
#: config's defaults (+8 "no object") the R50 tracker validates nearly every new-instance query
#: (~100 births per frame, >1000 live tracks after 12 frames), which no trained model does. A
#: +13 (segmenter, refiner) / +15 (tracker) "no object" bias keeps ~30-60 live tracks on the
#: 360p demo scene, births and kick-outs included — the regime of the OVIS R50 model.
R50_BENCH_BIASES = {"no_object_bias": 13.0, "tracker_no_object_bias": 15.0}


def make_r50_bundle(out_dir: str, seed: int = 0) -> str:
    """Export a seeded, spread random-init R50 OVIS model to ``out_dir`` (needs torch)."""
    import torch

    from dvis_trt.export.model.build import build_model
    from dvis_trt.export.onnx_export import export_bundle
    from dvis_trt.export.testing import spread_weights_
    from dvis_trt.export.config import load_config

    cfg = load_config(R50_CONFIG)
    torch.manual_seed(seed)
    model = build_model(cfg)
    spread_weights_(model, seed=seed, **R50_BENCH_BIASES)
    export_bundle(model.eval(), cfg, out_dir, progress=lambda line: print(line, flush=True))
    return out_dir


def _print(report: dict) -> None:
    print(f"== {report['mode']} ==")
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            for k2, v2 in value.items():
                print(f"    {k2:28s} {v2:9.2f}")
        elif isinstance(value, float):
            print(f"  {key:30s} {value:9.2f}")
        elif key != "mode":
            print(f"  {key:30s} {value}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--tracks", type=int, default=40, help="live tracks to keep (stub mode)")
    ap.add_argument("--size", default="360x640", help="frame size HxW (default 360x640)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--bundle", default=None, help="also run this bundle's real engines (ORT CPU)")
    ap.add_argument("--make-r50-bundle", default=None, metavar="DIR",
                    help="first export the R50 benchmark bundle (seeded spread weights, see "
                         "R50_BENCH_BIASES) to DIR and use it as --bundle")
    ap.add_argument("--video", default=None, help="video for --bundle (default: a demo MP4)")
    ap.add_argument("--engine-frames", type=int, default=15, help="frames of the --bundle run")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs in stub mode; the least disturbed one is reported")
    ap.add_argument("--json", default="host_overhead.json")
    args = ap.parse_args(argv)
    size = _parse_size(args.size)
    if args.make_r50_bundle:
        args.bundle = make_r50_bundle(args.make_r50_bundle)
    reports = [stub_run(args.frames, args.tracks, size, args.threads, repeat=args.repeat)]
    _print(reports[0])
    verdict = "PASS" if reports[0]["own_work_ms_per_frame"] < 20.0 else "OVER"
    print(f"  runtime's own work (tracker bookkeeping, Hungarian, top-K, RLE): "
          f"{reports[0]['own_work_ms_per_frame']:.2f} ms/frame vs 20 ms target: {verdict}")
    if args.bundle:
        reports.append(engine_run(args.bundle, args.video, args.engine_frames, size,
                                  args.threads, args.window))
        _print(reports[-1])
    doc = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                       "cpus": os.cpu_count()}, "reports": reports}
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
