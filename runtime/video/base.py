"""What every video source yields: :class:`Frame` and the :class:`VideoSource` interface."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np


log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


_REPAIR_HINT = ("re-encode or repair the file (e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p "
                "OUT.mp4`), or decode it leniently (`dvis-trt run --lenient`) to skip the damaged part")


def _one_line(text: object) -> str:
    """Collapse whitespace so an error message stays on one line."""
    return " ".join(str(text).split())


@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded frame.

    Attributes:
        index: 0-based position on the video's timeline: the order frames leave the decoder
            (for a frame folder: the sorted file order), except that in lenient decoding the
            frames lost to damage keep their slots (placed by timestamps), so the frames after
            them keep their true index (see ``VideoSource.lost_frames``).
        pts_seconds: presentation timestamp in seconds as stored in the container (not
            re-based; variable frame rate preserved), ``index / fps`` for a frame folder with a
            given ``fps``, or ``None`` when unknown.
        rgb: uint8 (H, W, 3) RGB, C-contiguous, rotation metadata already applied.
    """

    index: int
    pts_seconds: Optional[float]
    rgb: np.ndarray


class VideoSource:
    """A readable video: metadata known up front, frames on demand (re-iterable).

    Attributes:
        name: short name (file stem, folder name, or the YouTube-VIS video folder).
        path: the file or folder (``None`` for an explicit file list without a common folder).
        num_frames: number of frames if the container/folder says so, else ``None``.
        fps: average frame rate (frames/s) or ``None`` when unknown.
        size: ``(H, W)`` of the frames :meth:`iter_frames` yields (after rotation).
        video_id: the dataset's video id (YouTube-VIS sources), else ``None``.
        lost_frames: after a full :meth:`iter_frames`: ``[(start, stop), ...]`` timeline
            ranges of frames lost to damage (lenient decoding only; empty otherwise).
        timeline_frames: after a full :meth:`iter_frames`: the video's frame count on its
            timeline (decoded + lost), or ``None`` when the source does not track it.
    """

    name: str
    path: Optional[Path]
    num_frames: Optional[int]
    fps: Optional[float]
    size: Tuple[int, int]
    video_id: Optional[int] = None
    lost_frames: Sequence[Tuple[int, int]] = ()
    timeline_frames: Optional[int] = None

    def iter_frames(self) -> Iterator[Frame]:
        """Yield every frame from the start; each call starts over. Raises InputError."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        return self.iter_frames()

    def __repr__(self) -> str:
        h, w = self.size
        return (f"{type(self).__name__}(name={self.name!r}, size={h}x{w}, "
                f"num_frames={self.num_frames}, fps={self.fps})")


def _rate(value) -> Optional[float]:
    try:
        f = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if f > 0 and math.isfinite(f) else None
