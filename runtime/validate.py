"""Every input value checked at the border, with one clear line (no torch).

Three kinds of values reach the runtime from outside, and each is checked where it enters:

* **the bundle manifest's config block** (:func:`check_config_values`, called by
  ``InferenceConfig.from_dict``): finite numbers, thresholds in [0, 1], positive ``pixel_std``,
  sizes within what the stages can take (:data:`MAX_SIDE`), consistent counts;
* **dataset json fields** (:func:`check_ytvis_video`): integer ids, non-empty lists of relative
  file names, ``length`` equal to the number of file names;
* **numeric command-line options** (:func:`number` / :func:`count`, argparse types; and
  :func:`clamp_threads`): finite, in range, capped; a thread count above the machine's CPUs is
  clamped with a warning (more threads than cores only adds contention).

A bad value raises :class:`~dvis_trt.errors.BundleError` (manifest) or
:class:`~dvis_trt.errors.InputError` (everything else), or for argparse types an
``ArgumentTypeError`` that the CLI prints as one line; never an internal error.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Mapping, Optional

from dvis_trt.errors import BundleError, InputError

__all__ = ["MAX_SIDE", "MAX_QUERIES", "check_config_values", "check_ytvis_video", "number",
           "count", "clamp_threads", "available_cpus"]

#: Longest image side (pixels) a bundle may resize to: the official configs use <= 1333; 8192
#: is far above any of them and keeps one frame's features within a few GB.
MAX_SIDE = 8192
#: Upper bound for query / class / channel counts in a manifest (the official ones are <= 1024).
MAX_QUERIES = 100_000


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_config_values(kw: Mapping[str, Any], where: str = "manifest config") -> None:
    """Check a bundle config's values (types already checked). Raises BundleError, one line.

    Follows the official config's meaning: thresholds are probabilities, ``PIXEL_STD`` divides,
    ``MIN_SIZE_TEST`` <= ``MAX_SIZE_TEST`` (detectron2 ``ResizeShortestEdge``),
    ``OFFLINE_TOPK_NUM`` and ``MAX_NUM`` select among ``NUM_NEW_INS`` refiner queries.
    """
    def bad(name: str, value: Any, want: str) -> BundleError:
        return BundleError(f"{where} '{name}' = {value!r}: {want}; re-export the bundle (or fix "
                           "the config it came from)")

    for name in ("inference_select_threshold", "aux_inference_select_threshold",
                 "dis_fg_threshold"):
        v = kw.get(name)
        if not _finite(v) or not 0.0 <= float(v) <= 1.0:
            raise bad(name, v, "must be a probability in [0, 1]")
    for name in ("pixel_mean", "pixel_std"):
        vals = list(kw.get(name) or ())
        if not all(_finite(x) for x in vals):
            raise bad(name, vals, "must be 3 finite numbers")
    if not all(float(x) > 0 for x in kw["pixel_std"]):
        raise bad("pixel_std", list(kw["pixel_std"]), "every value must be > 0 (it divides)")
    for name in ("num_classes", "num_queries", "hidden_dim", "mask_dim", "num_new_ins",
                 "num_slots", "max_num", "offline_topk_num", "refiner_window_size"):
        v = kw.get(name)
        if v is not None and v > MAX_QUERIES:
            raise bad(name, v, f"is far beyond any DVIS-DAQ model (at most {MAX_QUERIES})")
    for name in ("min_size_test", "max_size_test"):
        v = kw.get(name)
        if v is not None and not 1 <= v <= MAX_SIDE:
            raise bad(name, v, f"must be 1..{MAX_SIDE} pixels (an image side the stages can "
                               "take)")
    if kw.get("min_size_test") and kw.get("max_size_test") and \
            kw["min_size_test"] > kw["max_size_test"]:
        raise bad("min_size_test", kw["min_size_test"],
                  f"must not exceed max_size_test ({kw['max_size_test']})")
    sd = kw.get("size_divisibility")
    if sd is not None and not 0 <= sd <= 1024:
        raise bad("size_divisibility", sd, "must be 0..1024")
    nf = kw.get("noise_frame_num")
    if nf is not None and nf < 0:
        raise bad("noise_frame_num", nf, "must be >= 0")
    fmt = kw.get("input_format")
    if fmt is not None and fmt not in ("RGB", "BGR"):
        raise bad("input_format", fmt, "must be 'RGB' or 'BGR'")


def check_ytvis_video(v: Any, i: int, where: str) -> None:
    """Check one ``videos[i]`` entry of a YouTube-VIS json. Raises InputError, one line."""
    if not isinstance(v, Mapping):
        raise InputError(f"{where}: videos[{i}] is not an object")
    vid = v.get("id")
    if isinstance(vid, bool) or not isinstance(vid, int):
        raise InputError(f"{where}: videos[{i}] needs an integer 'id', got {vid!r}")
    names = v.get("file_names")
    if not isinstance(names, list) or not names or \
            not all(isinstance(n, str) and n.strip() for n in names):
        raise InputError(f"{where}: video {vid} needs 'file_names', a non-empty list of "
                         "file names")
    for n in names:
        parts = n.replace("\\", "/").split("/")
        if os.path.isabs(n) or ".." in parts or "\0" in n:
            raise InputError(f"{where}: video {vid} file name {n!r} must be relative to "
                             "--ytvis-root (no absolute paths, no '..')")
    length = v.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length != len(names)):
        raise InputError(f"{where}: video {vid} says length {length!r} but lists "
                         f"{len(names)} file names")
    for key in ("width", "height"):
        x = v.get(key)
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or not
                              1 <= x <= 1 << 16):
            raise InputError(f"{where}: video {vid} has {key} {x!r}; expected a positive "
                             "integer")


def number(lo: Optional[float] = None, hi: Optional[float] = None, *,
           lo_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        rng = (f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, "
               f"{hi if hi is not None else 'inf'}]")
        if not math.isfinite(x) or (lo is not None and (x < lo or (lo_open and x == lo))) \
                or (hi is not None and x > hi):
            raise argparse.ArgumentTypeError(f"expected a finite number in {rng}, got {text}")
        return x
    return parse


def count(lo: int = 1, hi: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[lo, hi]``."""
    def parse(text: str) -> int:
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if x < lo or (hi is not None and x > hi):
            top = f"..{hi}" if hi is not None else " or more"
            raise argparse.ArgumentTypeError(f"expected an integer {lo}{top}, got {x}")
        return x
    return parse


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def clamp_threads(threads: Optional[int], option: str = "--threads") -> Optional[int]:
    """``threads`` capped at :func:`available_cpus`, with a one-line warning when capped."""
    if threads is None:
        return None
    n = available_cpus()
    if int(threads) > n:
        print(f"dvis-trt: warning: {option} {threads} is more than the {n} CPU(s) this process "
              f"can use; using {n}", file=sys.stderr, flush=True)
        return n
    return int(threads)
