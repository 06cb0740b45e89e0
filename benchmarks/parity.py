"""Parity of two runs' final instances: the same instance set (Hungarian matching on video
mask IoU with equal labels), IoU and score bounds; a mismatch makes a bench row invalid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping

import numpy as np



#: per-row parity bounds (fp32 rows / reduced-precision rows), see compare_instances.
#: fp32: the R50 segmenter's outputs agree to ~3e-6 relative between ORT and eager torch, but
#: the spread test weights amplify the tracker's pooled-mask position embeds 30x (pos_scale),
#: so final scores of the same instances differ by up to ~1.1e-3 on the R50 360p clip (IoU >=
#: 0.993, same track ids); 1e-2 keeps a 9x margin over that and still fails any run whose
#: instances or classes differ (those move scores by >= 0.05, or fail the matching outright).
FP32_PARITY = {"iou_min": 0.9, "score_atol": 1e-2}
LOWP_PARITY = {"iou_min": 0.8, "score_atol": 5e-2}
LOWP_BACKENDS = ("torch-fp16",)


# =============================================================================================
# outputs, parity
# =============================================================================================
@dataclass
class Instances:
    """Final instances of a clip: scores (S,), labels (S,) 0-based, track_ids (S,),
    masks bool (S, T, H, W) at the original frame size."""

    scores: np.ndarray
    labels: np.ndarray
    track_ids: np.ndarray
    masks: np.ndarray

    @classmethod
    def from_eager(cls, out: Mapping[str, Any]) -> "Instances":
        return cls(np.asarray(out["scores"], np.float32), np.asarray(out["labels"], np.int64),
                   np.asarray(out["track_ids"], np.int64), np.asarray(out["masks"], bool))

    @classmethod
    def from_video_result(cls, res) -> "Instances":
        from dvis_trt.runtime.results import decode_rle
        size = tuple(res.image_size)
        t = int(res.num_frames)
        masks = np.zeros((len(res.scores), t, *size), bool)
        for i, segs in enumerate(res.segmentations):
            masks[i] = decode_rle(segs, size)
        return cls(np.asarray(res.scores, np.float32), np.asarray(res.labels, np.int64),
                   np.asarray(res.track_ids, np.int64), masks)


def compare_instances(ref: Instances, got: Instances, iou_min: float = FP32_PARITY["iou_min"],
                      score_atol: float = FP32_PARITY["score_atol"]) -> Dict[str, Any]:
    """Is ``got`` the same instance set as ``ref`` (the eager baseline)?

    Instances are paired by a Hungarian matching that maximises video mask IoU among pairs with
    equal labels. ``ok`` needs: the same number of instances and frame size, every instance
    paired with an equal label, each pair's IoU >= ``iou_min`` and score difference <=
    ``score_atol``. Track ids are reported (``track_ids_equal``) but do not decide: ids are
    labels only (DESIGN.md). Returns a dict (``ok``, ``reason``, counts, ``min_iou``,
    ``mean_iou``, ``max_score_diff``, ...).
    """
    from dvis_trt.runtime.accuracy import match_pairs
    out: Dict[str, Any] = {"ref_instances": int(len(ref.scores)),
                           "instances": int(len(got.scores)), "iou_min": iou_min,
                           "score_atol": score_atol}
    if ref.masks.shape[1:] != got.masks.shape[1:]:
        out.update(ok=False, reason=f"mask shape {got.masks.shape[1:]} != baseline "
                                    f"{ref.masks.shape[1:]}")
        return out
    if len(ref.scores) != len(got.scores):
        out.update(ok=False, reason=f"{len(got.scores)} instances, baseline has "
                                    f"{len(ref.scores)}")
    if len(ref.scores) == 0 or len(got.scores) == 0:
        out.setdefault("ok", len(ref.scores) == len(got.scores))
        out.setdefault("reason", None)
        out.update(matched=0, min_iou=None, mean_iou=None, max_score_diff=None)
        return out
    # equal labels first (a bonus above any IoU), then the largest IoU
    rows, cols, iou, same = match_pairs(ref.masks, ref.labels, got.masks, got.labels, 2.0)
    pair_iou = iou[rows, cols]
    pair_same = same[rows, cols]
    diffs = np.abs(ref.scores[rows] - got.scores[cols])
    out.update(matched=int(pair_same.sum()), min_iou=float(pair_iou.min()),
               mean_iou=float(pair_iou.mean()), max_score_diff=float(diffs.max()),
               track_ids_equal=bool(len(ref.track_ids) == len(got.track_ids) and
                                    np.array_equal(ref.track_ids[rows], got.track_ids[cols])))
    if "ok" in out:
        return out
    if not pair_same.all():
        out.update(ok=False, reason=f"{int((~pair_same).sum())} instance(s) without an "
                                    "equal-label partner")
    elif pair_iou.min() < iou_min:
        out.update(ok=False, reason=f"mask IoU {pair_iou.min():.3f} < {iou_min}")
    elif diffs.max() > score_atol:
        out.update(ok=False, reason=f"score differs by {diffs.max():.2e} > {score_atol}")
    else:
        out.update(ok=True, reason=None)
    return out


#: bundle precisions whose rows are judged by the accuracy report (dvis_trt.runtime.accuracy)
LOWP_PRECISIONS = ("int8", "fp16", "bf16")


def accuracy_parity(ref: "Instances", got: "Instances") -> Dict[str, Any]:
    """Parity of a reduced-precision bundle's row (int8 / fp16 / bf16): the accuracy report's
    figures and verdict (:mod:`dvis_trt.runtime.accuracy`, thresholds there) instead of the
    fp32 bounds, which such a bundle is not meant to meet."""
    from dvis_trt.runtime.accuracy import InstanceSet, compare_instances as accuracy
    rep = accuracy(InstanceSet(ref.masks, ref.labels, ref.scores),
                   InstanceSet(got.masks, got.labels, got.scores))
    d = rep.to_dict()
    return {"ok": rep.passed, "reason": None if rep.passed else d["verdict"],
            "accuracy": {k: d[k] for k in ("verdict", "matched_fraction", "label_agreement",
                                           "mask_iou_mean", "mask_iou_worst",
                                           "score_delta_max", "thresholds")},
            "instances": int(len(got.scores)), "ref_instances": int(len(ref.scores))}
