"""YouTube-VIS results: the one RLE encoder/decoder (pycocotools) and the results file.

Results follow the official ``instances_to_coco_json_video`` + ``_eval_predictions``
(``dvis_Plus/data_video/ytvis_eval.py``): one dict per (instance, class) prediction of a video,

``{"video_id": int, "score": float, "category_id": int, "segmentations": [RLE per frame],
"track_id": int}``

- ``category_id`` is the *dataset* category id: the official evaluator maps the model's
  contiguous 0-based label through ``thing_dataset_id_to_contiguous_id`` reversed, which for
  YouTube-VIS 2019/2021 and OVIS (ids 1..K in order) is ``label + 1``. Other datasets pass
  their own id list (``category_ids[label]``).
- ``segmentations`` has one RLE per frame of the video, *every* frame (an empty mask still gets
  an RLE, never ``None``), each ``pycocotools.mask.encode`` of the Fortran-ordered uint8 mask
  with ``counts`` decoded to a utf-8 ``str``; ``size`` is ``[H, W]``.
- ``track_id`` is ours (the official output carries no track id; evaluators ignore extra keys).

Files are written through :mod:`dvis_trt.fileio` (atomic: temp file + fsync + rename).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from dvis_trt.fileio import atomic_write_json

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# RLE
# --------------------------------------------------------------------------------------------

def encode_rle_block(masks: np.ndarray) -> List[List[Dict[str, Any]]]:
    """(S, t, H, W) masks -> S lists of t COCO RLEs (``counts`` as ``str``): THE RLE encoder.

    One ``pycocotools.mask.encode`` call for the whole block: pycocotools wants (H, W, n)
    Fortran-ordered uint8, which is the memory of a C-ordered (n, W, H) array, so the block
    costs one transpose copy (none when ``masks`` is already a transposed view of such an array)
    and a zero-copy bool -> uint8 view. Same bytes as the official per-frame
    ``mask_util.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0]``. Non-zero is
    foreground. The RLEs of one block share one ``size`` list ``[H, W]`` (a long video holds
    many thousands of RLEs).
    """
    from pycocotools import mask as mask_util

    s, t, h, w = masks.shape
    if s == 0 or t == 0:
        return [[] for _ in range(s)]
    nwh = np.ascontiguousarray(np.asarray(masks, dtype=bool).transpose(0, 1, 3, 2))
    fortran = nwh.reshape(s * t, w, h).view(np.uint8).transpose(2, 1, 0)   # (H, W, S*t), F order
    rles = mask_util.encode(fortran)
    size = [int(h), int(w)]
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
        r["size"] = size
    return [rles[i * t:(i + 1) * t] for i in range(s)]


def encode_rle(masks: np.ndarray) -> List[Dict[str, Any]]:
    """Boolean masks of one instance -> one COCO RLE per frame (:func:`encode_rle_block`).

    Args:
        masks: (T, H, W) or (H, W); bool or any numeric dtype (non-zero = foreground).
    Returns:
        list of T dicts ``{"size": [H, W], "counts": str}`` (a single dict for a 2-D input is
        still returned as a 1-element list).
    Raises:
        ValueError: masks of another rank.
    """
    m = np.asarray(masks)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks must be (T, H, W) or (H, W), got shape {m.shape}")
    return encode_rle_block(m[None])[0]


def decode_rle(segmentations: Sequence[Optional[Mapping[str, Any]]],
               size: Optional[Sequence[int]] = None) -> np.ndarray:
    """RLEs (compressed ``str``/``bytes`` counts or YouTube-VIS uncompressed ``list`` counts, or
    ``None`` for a frame without mask) -> bool (T, H, W).

    Args:
        segmentations: per-frame RLE dicts / None.
        size: (H, W), needed only when every entry is None.
    Raises:
        ValueError: frames of different sizes, or no size known.
    """
    from pycocotools import mask as mask_util

    sizes = {tuple(int(v) for v in s["size"]) for s in segmentations if s is not None}
    if size is not None:
        sizes.add(tuple(int(v) for v in size))
    if len(sizes) > 1:
        raise ValueError(f"segmentations have different sizes: {sorted(sizes)}")
    if not sizes:
        if not segmentations:
            raise ValueError("no segmentations and no size given")
        raise ValueError("every segmentation is None; pass size=(H, W)")
    h, w = sizes.pop()
    out = np.zeros((len(segmentations), h, w), dtype=bool)
    present, rles = [], []
    for t, seg in enumerate(segmentations):
        if seg is None:
            continue
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE (YouTube-VIS ground truth)
            rle = mask_util.frPyObjects(dict(seg), h, w)
        else:
            rle = {"size": [h, w],
                   "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}
        present.append(t)
        rles.append(rle)
    if rles:  # one vectorised decode: (H, W, n) Fortran-ordered
        with warnings.catch_warnings():  # pycocotools' own numpy-2 copy= deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_util.decode(rles)
        out[present] = np.transpose(decoded, (2, 0, 1)) != 0
    return out


# --------------------------------------------------------------------------------------------
# Instances -> YouTube-VIS results
# --------------------------------------------------------------------------------------------

@dataclass
class InstanceTrack:
    """One predicted instance of a video (what the pipeline hands to the writers).

    Attributes:
        track_id: our track id (deterministic integer label).
        label: 0-based contiguous class index (the model's output order).
        score: confidence in [0, 1].
        masks: bool (T, H, W) at the original frame size, or None if ``segmentations`` is set.
        segmentations: per-frame RLE dicts (``encode_rle`` output), or None if ``masks`` is set.
    """

    track_id: int
    label: int
    score: float
    masks: Optional[np.ndarray] = None
    segmentations: Optional[List[Dict[str, Any]]] = None

    def rles(self) -> List[Dict[str, Any]]:
        """Per-frame RLEs (encoded from ``masks`` on demand)."""
        if self.segmentations is not None:
            return self.segmentations
        if self.masks is None:
            raise ValueError(f"track {self.track_id} has neither masks nor segmentations")
        return encode_rle(self.masks)

    @property
    def num_frames(self) -> int:
        if self.masks is not None:
            return int(np.asarray(self.masks).shape[0])
        return len(self.segmentations or [])

    def mask(self, t: int) -> np.ndarray:
        """Bool (H, W) mask of frame ``t``."""
        if self.masks is not None:
            return np.asarray(self.masks[t]) != 0
        return decode_rle([self.rles()[t]])[0]


def category_id_for(label: int, category_ids: Optional[Sequence[int]] = None) -> int:
    """Contiguous 0-based label -> dataset category id (official ``reverse_id_mapping``).

    ``category_ids`` lists the dataset's category ids in contiguous order (sorted ids, as the
    official ``load_ytvis_json`` builds ``thing_dataset_id_to_contiguous_id``); default: ids are
    ``1..K`` (YouTube-VIS 2019/2021, OVIS), i.e. ``label + 1``.
    """
    label = int(label)
    if label < 0:
        raise ValueError(f"class label must be >= 0, got {label}")
    if category_ids is None:
        return label + 1
    if label >= len(category_ids):
        raise ValueError(f"class label {label} is out of range for {len(category_ids)} "
                         f"dataset categories")
    return int(category_ids[label])


def ytvis_results(video_id: int, instances: Iterable[InstanceTrack],
                  category_ids: Optional[Sequence[int]] = None,
                  num_frames: Optional[int] = None) -> List[Dict[str, Any]]:
    """One video's instances -> YouTube-VIS result dicts (official ``instances_to_coco_json_video``).

    Args:
        video_id: the dataset's video id.
        instances: :class:`InstanceTrack` objects (masks at the original frame size).
        category_ids: dataset category ids in contiguous order (default ``label + 1``).
        num_frames: if given, every instance must cover exactly this many frames.
    Returns:
        list of ``{"video_id", "score", "category_id", "segmentations", "track_id"}``, in the
        instances' order.
    Raises:
        ValueError: a label out of range, a non-finite score, or a wrong frame count.
    """
    out = []
    for inst in instances:
        score = float(inst.score)
        if not math.isfinite(score):
            raise ValueError(f"track {inst.track_id}: score is {score}")
        segs = inst.rles()
        if num_frames is not None and len(segs) != num_frames:
            raise ValueError(f"track {inst.track_id} has {len(segs)} frames, the video has "
                             f"{num_frames}")
        out.append({"video_id": int(video_id), "score": score,
                    "category_id": category_id_for(inst.label, category_ids),
                    "segmentations": segs, "track_id": int(inst.track_id)})
    return out


def write_results(path: PathLike, results: Sequence[Mapping[str, Any]]) -> Path:
    """Write a results list (all videos, flat, as ``results.json`` for the YouTube-VIS/OVIS
    evaluation server) atomically. Returns ``Path(path)``."""
    return atomic_write_json(path, list(results))
