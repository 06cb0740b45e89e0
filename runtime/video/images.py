"""Frame folders and image lists (Pillow, as detectron2's ``read_image``), natural sort order."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from dvis_trt.errors import InputError

from .base import Frame, VideoSource, _one_line, _rate

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


#: Image file suffixes a frame folder may hold (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def natural_sort_key(name: str):
    """Sort key putting ``frame9.jpg`` before ``frame10.jpg`` (digit runs compare as numbers)."""
    parts = re.split(r"(\d+)", name)
    return tuple((int(p), p) if i % 2 else (p.lower(), p) for i, p in enumerate(parts))


def list_frame_files(folder: PathLike) -> List[Path]:
    """Image files of ``folder`` (not recursive, hidden files skipped), natural order.

    Raises:
        InputError: missing folder, or no image file in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"frame folder '{folder}' does not exist; check the path")
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    if not files:
        raise InputError(f"frame folder '{folder}' holds no image files "
                         f"({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}); pass a folder of frames "
                         f"or a video file")
    return sorted(files, key=lambda p: natural_sort_key(p.name))


def read_image_rgb(path: PathLike) -> np.ndarray:
    """One image file -> uint8 (H, W, 3) RGB with EXIF orientation applied.

    Follows detectron2 ``data/detection_utils.py::read_image`` (Pillow, exif transpose,
    ``convert("RGB")``), which is how the official code reads YouTube-VIS frames.

    Raises:
        InputError: the file is missing or not an image Pillow can decode.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with Image.open(path) as img:
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # broken EXIF block: keep the stored orientation
                pass
            return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
    except FileNotFoundError:
        raise InputError(f"frame '{path}' does not exist; check the path") from None
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError on truncated files, ...
        raise InputError(f"cannot read frame '{path}': {_one_line(exc)}; replace the file or "
                         f"remove it from the folder") from None


class ImageSequenceSource(VideoSource):
    """Frames stored as image files (one per frame), read with Pillow.

    Args:
        files: image paths in frame order.
        name: the video's name.
        fps: frame rate to attach (``pts_seconds = index / fps``), or None (``pts_seconds``
            None).
        video_id: dataset video id, if any.
        expected_size: (H, W) the dataset announces; checked against the first frame.
        path: the folder (for display).

    Raises:
        InputError: no files, a missing file, or a first frame whose size differs from
        ``expected_size``; while iterating, a frame of another size or an unreadable frame.
    """

    def __init__(self, files: Sequence[PathLike], *, name: str, fps: Optional[float] = None,
                 video_id: Optional[int] = None, expected_size: Optional[Tuple[int, int]] = None,
                 path: Optional[PathLike] = None):
        self.files = [Path(f) for f in files]
        self.name = name
        self.path = Path(path) if path is not None else None
        self.fps = _rate(fps) if fps is not None else None
        self.video_id = video_id
        self.num_frames = len(self.files)
        where = f"'{self.path}'" if self.path is not None else f"video '{name}'"
        if not self.files:
            raise InputError(f"{where} has no frames")
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise InputError(f"{where}: {len(missing)} of {len(self.files)} frame files are "
                             f"missing, first '{missing[0]}'; check the dataset root")
        first = read_image_rgb(self.files[0])
        self.size = (int(first.shape[0]), int(first.shape[1]))
        if expected_size is not None and tuple(int(v) for v in expected_size) != self.size:
            eh, ew = expected_size
            raise InputError(f"{where}: frame '{self.files[0]}' is {self.size[0]}x{self.size[1]} "
                             f"but the dataset says {eh}x{ew} (HxW); check the dataset json")

    def iter_frames(self) -> Iterator[Frame]:
        """Yield frames in file order: uint8 (H, W, 3) RGB; raises InputError on a bad frame."""
        for i, f in enumerate(self.files):
            rgb = read_image_rgb(f)
            if rgb.shape[:2] != self.size:
                raise InputError(f"frame {i} '{f}' is {rgb.shape[0]}x{rgb.shape[1]} but frame 0 "
                                 f"is {self.size[0]}x{self.size[1]}; all frames of a video must "
                                 f"have one size")
            yield Frame(i, (i / self.fps) if self.fps else None, rgb)
