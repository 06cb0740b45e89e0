"""YouTube-VIS / OVIS dataset json: the videos it lists, each openable as a frame folder."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union


from dvis_trt.errors import InputError

from .base import _one_line
from .images import ImageSequenceSource

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class YtvisVideo:
    """One video of a YouTube-VIS / OVIS dataset json.

    Attributes:
        id: the dataset's ``video_id`` (what results must carry).
        name: the frame folder name (parent of the first ``file_name``).
        file_names: absolute frame paths (root joined with the json's ``file_names``).
        height, width: as the json says (or None).
        length: number of frames.
    """

    id: int
    name: str
    file_names: Tuple[Path, ...]
    height: Optional[int]
    width: Optional[int]
    length: int

    def open(self, fps: Optional[float] = None) -> ImageSequenceSource:
        """The video's frames as a source (checks files exist and the first frame's size)."""
        size = (self.height, self.width) if self.height and self.width else None
        folder = self.file_names[0].parent if self.file_names else None
        return ImageSequenceSource(self.file_names, name=self.name, fps=fps, video_id=self.id,
                                   expected_size=size, path=folder)


def load_ytvis_videos(json_path: PathLike, root: PathLike) -> List[YtvisVideo]:
    """List the videos of a YouTube-VIS-format json (``videos[*].id/file_names/height/width``).

    Follows the official ``load_ytvis_json`` (``dvis_Plus/data_video/datasets/ytvis.py``):
    videos sorted by id, frame paths = ``root / file_name``, ``length`` frames.

    Args:
        json_path: e.g. ``ytvis_2019/valid.json`` or OVIS ``annotations_valid.json``.
        root: the image root (e.g. ``ytvis_2019/valid/JPEGImages``).

    Raises:
        InputError: missing/invalid json, no ``videos`` list, a video without ``id`` or
        ``file_names``, or a missing root folder.
    """
    json_path, root = Path(json_path), Path(root)
    if not json_path.is_file():
        raise InputError(f"YouTube-VIS json '{json_path}' does not exist; check --ytvis-json")
    if not root.is_dir():
        raise InputError(f"YouTube-VIS image root '{root}' is not a folder; check --ytvis-root")
    try:
        with open(json_path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read YouTube-VIS json '{json_path}': {_one_line(exc)}") from None
    videos = data.get("videos") if isinstance(data, dict) else None
    if not isinstance(videos, list):
        raise InputError(f"'{json_path}' has no 'videos' list; is it a YouTube-VIS/OVIS "
                         f"annotation file?")
    out: List[YtvisVideo] = []
    from ..validate import check_ytvis_video  # ids, file names, lengths: one line each
    seen_ids = set()
    for k, v in enumerate(videos):
        if not isinstance(v, dict) or "id" not in v or not v.get("file_names"):
            raise InputError(f"'{json_path}': videos[{k}] lacks 'id' or 'file_names'")
        check_ytvis_video(v, k, f"'{json_path}'")
        if v["id"] in seen_ids:
            raise InputError(f"'{json_path}': video id {v['id']} appears twice; ids must be "
                             "unique (results are keyed by them)")
        seen_ids.add(v["id"])
        names = list(v["file_names"])
        length = int(v.get("length") or len(names))
        names = names[:length]
        folder = Path(names[0]).parent.name or str(v["id"])
        out.append(YtvisVideo(
            id=int(v["id"]), name=folder,
            file_names=tuple(root / n for n in names),
            height=int(v["height"]) if v.get("height") else None,
            width=int(v["width"]) if v.get("width") else None,
            length=length))
    out.sort(key=lambda x: x.id)
    return out
