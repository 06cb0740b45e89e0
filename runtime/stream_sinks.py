"""Sinks for ``dvis-trt stream``: per-frame results as JSON Lines, the overlay video.

Both write to a temporary file beside their target and rename it when the stream stops; an
output path that exists is refused (a user's file is never written over). The loop is in
:mod:`dvis_trt.runtime.stream`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, TextIO, Union

import numpy as np

from dvis_trt.errors import InputError

from .stream_sources import PathLike


# --------------------------------------------------------------------------------------------
# sinks
# --------------------------------------------------------------------------------------------
def _claim(path: PathLike, what: str) -> Path:
    """Refuse an output path that exists (a user's file is never written over)."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        raise InputError(f"{what} {p} exists; dvis-trt never writes over a file it did not "
                         "make: choose a new name or remove it")
    if not p.parent.is_dir():
        raise InputError(f"{what} {p}: folder {p.parent} does not exist")
    return p


class JsonlSink:
    """JSON Lines, one record per frame (:meth:`FrameResult.to_json`), to stdout (``"-"``) or a
    new file. A file is created exclusively (never over an existing one) and every record is
    one ``write`` of a whole line, flushed at once: a reader tailing the file sees whole lines,
    and a stopped stream leaves a valid file with every finished frame."""

    def __init__(self, target: Union[PathLike, TextIO] = "-", include_invalid: bool = False,
                 class_names: Optional[Sequence[str]] = None):
        import sys

        self.include_invalid, self.class_names = include_invalid, class_names
        self._own = False
        if target == "-":
            self._f = sys.stdout
        elif hasattr(target, "write"):
            self._f = target
        else:
            p = _claim(target, "--jsonl output")
            self._f = open(p, "x", encoding="utf-8")
            self._own = True

    def write(self, result) -> None:
        import json

        self._f.write(json.dumps(result.to_json(self.include_invalid, self.class_names),
                                 separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._own and not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class OverlaySink:
    """The processed frames with masks, track ids, classes and scores drawn, encoded to a new
    video file. Written to a temporary file beside the target and renamed when the stream
    stops (a video is unreadable before its trailer is written). A failure of the overlay
    costs only the overlay: it is reported once and the stream goes on."""

    def __init__(self, path: PathLike, fps: Optional[float] = None,
                 class_names: Optional[Sequence[str]] = None, min_score: float = 0.3):
        self.path = _claim(path, "--overlay output")
        self.fps = fps or 25.0
        self.class_names, self.min_score = class_names, float(min_score)
        from dvis_trt.outputs import temp_path

        self._tmp = temp_path(self.path)  # beside the target: the final rename is atomic
        self._out = self._stream = None
        self.failed: Optional[str] = None

    def write(self, result, rgb: np.ndarray) -> None:
        if self.failed:
            return
        try:
            self._write(result, rgb)
        except Exception as exc:  # the overlay is secondary: keep the stream going
            self.failed = f"{type(exc).__name__}: {exc}"
            self._abort()

    def _write(self, result, rgb: np.ndarray) -> None:
        from fractions import Fraction

        from .overlay import render_overlay_frame, track_color
        from .results import decode_rle
        from .video.av_source import _import_av

        av = _import_av()
        if self._out is None:
            from .overlay import _pick_encoder

            codec, pix_fmt, opts = _pick_encoder(self.path.suffix.lower())
            self._out = av.open(str(self._tmp), mode="w")
            self._stream = self._out.add_stream(codec, rate=Fraction(self.fps).limit_denominator(
                1001))
            self._stream.width, self._stream.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
            self._stream.pix_fmt = pix_fmt
            if opts:
                self._stream.options = opts
        keep = [k for k in range(len(result.track_ids))
                if result.valid[k] and result.scores[k] >= self.min_score]
        masks = decode_rle([result.rles[k] for k in keep]) if keep else []
        names = self.class_names
        texts = [f"{int(result.track_ids[k])} "
                 f"{names[int(result.labels[k])] if names else int(result.labels[k]) + 1} "
                 f"{float(result.scores[k]):.2f}" for k in keep]
        img = render_overlay_frame(rgb, list(masks), [track_color(int(result.track_ids[k]))
                                                      for k in keep], texts)
        h, w = self._stream.height, self._stream.width
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:h, :w]), format="rgb24")
        for packet in self._stream.encode(frame):
            self._out.mux(packet)

    def _abort(self) -> None:
        try:
            if self._out is not None:
                self._out.close()
        except Exception:
            pass
        self._out = None
        if self._tmp.exists():
            self._tmp.unlink()

    def close(self) -> None:
        if self._out is None:
            return
        try:
            for packet in self._stream.encode():
                self._out.mux(packet)
            self._out.close()
            self._out = None
            if self.path.exists():  # appeared meanwhile: still never written over
                raise InputError(f"--overlay output {self.path} appeared while streaming; the "
                                 f"overlay is left in {self._tmp}")
            os.replace(self._tmp, self.path)
        except InputError:
            raise
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            self._abort()
