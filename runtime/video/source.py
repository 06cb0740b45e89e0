"""The one entry point for a user's input path: :func:`open_source`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union


from dvis_trt.errors import InputError

from .av_source import AVVideoSource
from .base import VideoSource
from .images import IMAGE_EXTENSIONS, ImageSequenceSource, list_frame_files

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def open_source(path: PathLike, *, strict: bool = True, fps: Optional[float] = None,
                threads: int = 0) -> VideoSource:
    """Open a video file, a folder of frames or a single image.

    Args:
        path: a video file (anything FFmpeg reads), a folder of image frames
            (YouTube-VIS ``JPEGImages/<video>/``), or one image file (a 1-frame video).
        strict: video files only — see :class:`AVVideoSource`.
        fps: frame rate to attach to frame folders / images (ignored for video files, whose
            container gives it).
        threads: decoder threads for video files (0 = FFmpeg's choice).

    Returns:
        :class:`AVVideoSource` or :class:`ImageSequenceSource`.

    Raises:
        InputError: missing path, unreadable file, empty folder, no frames.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input '{p}' does not exist; pass a video file or a folder of frames")
    if p.is_dir():
        return ImageSequenceSource(list_frame_files(p), name=p.name, fps=fps, path=p)
    if p.suffix.lower() == ".json":
        raise InputError(f"'{p}' is a JSON file; pass a YouTube-VIS dataset with --ytvis-json "
                         f"and --ytvis-root, or a video file / frame folder")
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageSequenceSource([p], name=p.stem, fps=fps, path=p)
    return AVVideoSource(p, strict=strict, threads=threads)
