"""Scaling sweep: pipeline time vs number of frames and vs input resolution.

* **frames**: the demo scene (:func:`dvis_trt.runtime.synthetic.render_scene`) at the bench
  video's size, cut to 12 / 48 / 192 frames (``frame_counts``), processed at the bundle's
  configured resize (``MIN_SIZE_TEST``), one clip. Per-frame work (segmenter, tracker, masks)
  grows linearly; the refiner's temporal attention and the frame-by-frame Hungarian link grow
  with the clip length, so s/frame shows whether anything is worse than linear.
* **resolution**: the scene rendered at 360p / 480p / 720p (16:9) with the smallest frame
  count, each processed at its native short edge (``MIN_SIZE_TEST`` set to the height for the
  point; the bundles' H, W are dynamic). With the config's own ``MIN_SIZE_TEST`` (480 for R50
  OVIS) every input would be resized to the same 480p and only decode/resize would change.

Decoding is excluded (frames are rendered in memory); parity is not re-checked in the sweep
(the main bench checks it). Runners are alternated per point.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .harness import summarize

__all__ = ["run_sweep", "size_16x9"]


def size_16x9(height: int) -> Tuple[int, int]:
    """(H, W) of a 16:9 frame with ``height`` rows, W rounded to an even number."""
    w = int(round(height * 16 / 9 / 2)) * 2
    return int(height), w


def _point(runners: Mapping[str, Any], frames: Sequence[np.ndarray], repeats: int,
           log: Callable[[str], None], tag: str) -> Dict[str, Any]:
    names = list(runners)
    walls: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(max(1, repeats)):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            out = runners[n].run(frames)
            walls[n].append(out.wall if out is not None else time.perf_counter() - t0)
            log(f"  sweep {tag} {n}: {walls[n][-1]:.2f} s")
    res = {}
    nf = len(frames)
    for n in names:
        st = summarize(walls[n])
        res[n] = {"wall_s": st, "fps": nf / st["p50"], "s_per_frame": st["p50"] / nf}
    return res


def run_sweep(runners: Mapping[str, Any], frame_counts: Sequence[int] = (12, 48, 192),
              sizes: Sequence[int] = (360, 480, 720), base_size: Tuple[int, int] = (360, 640),
              repeats: int = 1, seed: int = 1,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Time each runner (``run(frames) -> RunOutput``; :class:`~.harness.EagerRunner` /
    :class:`~.harness.PipelineRunner`) over the two sweeps of the module docstring.

    Returns ``{"frames": [point...], "resolution": [point...], "note": str}``; a point is
    ``{"frames": n, "size": [H, W], "min_size_test": int, "results": {runner: {"wall_s":
    stats, "fps", "s_per_frame"}}}``. Raises ValueError for empty or non-positive sweeps.
    """
    from dvis_trt.runtime.synthetic import render_scene

    counts = sorted({int(n) for n in frame_counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"sweep frame counts must be positive, got {list(frame_counts)}")
    heights = sorted({int(s) for s in sizes})
    if not heights or heights[0] < 32:
        raise ValueError(f"sweep sizes must be >= 32 rows, got {list(sizes)}")
    out: Dict[str, Any] = {"frames": [], "resolution": [],
                           "note": "decode excluded (frames rendered in memory); frames sweep at "
                                   "the video size with the bundle's MIN_SIZE_TEST; resolution "
                                   "sweep at each height's native short edge; one clip each"}
    if not runners:
        return out
    base = (int(base_size[0]), int(base_size[1]))
    frames = render_scene(counts[-1], base, seed=seed)[0]
    some = next(iter(runners.values()))
    min_size = int(some.settings.min_size_test)
    for n in counts:
        log(f"sweep: {n} frames at {base[0]}x{base[1]}")
        out["frames"].append({"frames": n, "size": list(base), "min_size_test": min_size,
                              "results": _point(runners, list(frames[:n]), repeats, log,
                                                f"{n}f")})
    del frames
    n = counts[0]
    for h in heights:
        size = size_16x9(h)
        fr = list(render_scene(n, size, seed=seed)[0])
        old = {k: r.set_min_size(h) for k, r in runners.items()}
        try:
            log(f"sweep: {n} frames at {size[0]}x{size[1]} (MIN_SIZE_TEST {h})")
            out["resolution"].append({"frames": n, "size": list(size), "min_size_test": h,
                                      "results": _point(runners, fr, repeats, log, f"{h}p")})
        finally:
            for k, r in runners.items():
                r.set_min_size(old[k])
    return out
