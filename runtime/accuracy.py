"""Accuracy report of a reduced-precision bundle (int8, fp16, bf16) against its fp32 bundle.

``dvis-trt check BUNDLE --against FP32_BUNDLE VIDEO [VIDEO ...]`` and every ``export`` /
``quantize`` that makes an int8/fp16/bf16 bundle from a calibration or validation video write
this report (``accuracy.json`` in the bundle). Both bundles run the same video(s) end to end in
ONNX Runtime (CPU); their final instances (what ``dvis-trt run`` writes) are compared:

* **matching**: per video, Hungarian assignment (``scipy.optimize.linear_sum_assignment``) of
  candidate to reference instances on spatio-temporal mask IoU (YouTube-VIS's video IoU:
  intersections summed over frames / unions summed over frames); a label match breaks ties
  (one query can appear twice with two labels). A pair counts as matched at IoU >= 0.5.
* **matched fraction**: matched pairs / reference instances (all videos together);
  **label agreement**: matched pairs with the same label / matched pairs;
* **per-frame mask IoU** of matched pairs (frames where either mask is non-empty): mean and
  worst; **score deltas**: mean and max |score - reference score| over matched pairs;
* **tracks**: tracker sequences created by each bundle, and matched instances whose first or
  last frame (the track's birth / end) differs;
* **per stage**: max and mean |difference| relative to max |reference| of every stage output,
  both bundles fed the inputs each stage received first in the reference's run of the first
  video (real frames, real tracks).

The one-line verdict holds the figures against :data:`THRESHOLDS` (>= 95 % of the reference's
instances matched, mean per-frame IoU >= 0.90, labels agree on >= 95 % of matched pairs).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from dvis_trt.errors import InputError

__all__ = ["THRESHOLDS", "MATCH_IOU", "REPORT_FILE", "InstanceSet", "AccuracyReport",
           "compare_instances", "compare_bundles", "instances_from_result", "write_report",
           "video_iou", "match_pairs"]

#: Pass thresholds of the verdict.
THRESHOLDS = {"matched_fraction": 0.95, "mean_iou": 0.90, "label_agreement": 0.95}
#: Video IoU at which a Hungarian pair counts as the same instance.
MATCH_IOU = 0.5
REPORT_FILE = "accuracy.json"


@dataclasses.dataclass
class InstanceSet:
    """Final instances of one video: ``masks`` bool (S, T, H, W), ``labels`` int (S,),
    ``scores`` float (S,), ``num_tracks`` tracker sequences created."""

    masks: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    num_tracks: int = 0


def instances_from_result(result) -> InstanceSet:
    """An :class:`InstanceSet` from a pipeline ``VideoResult`` (RLEs decoded by
    :func:`dvis_trt.runtime.results.decode_rle`; frames without a segmentation are empty)."""
    from .results import decode_rle  # noqa: PLC0415

    size = tuple(int(x) for x in result.image_size)
    masks = np.zeros((len(result.scores), int(result.num_frames), *size), dtype=bool)
    for i, segs in enumerate(result.segmentations):
        masks[i] = decode_rle(segs, size)
    return InstanceSet(masks, np.asarray(result.labels, np.int64),
                       np.asarray(result.scores, np.float64), int(result.num_tracks))


@dataclasses.dataclass
class AccuracyReport:
    """Figures of one comparison (see the module docstring). ``stages``: stage -> output ->
    ``{"max_rel", "mean_rel"}``."""

    reference_instances: int = 0
    candidate_instances: int = 0
    matched: int = 0
    same_label: int = 0
    frame_ious: List[float] = dataclasses.field(default_factory=list)
    video_ious: List[float] = dataclasses.field(default_factory=list)
    score_deltas: List[float] = dataclasses.field(default_factory=list)
    reference_tracks: int = 0
    candidate_tracks: int = 0
    span_differs: int = 0
    stages: Dict[str, Dict[str, Dict[str, float]]] = dataclasses.field(default_factory=dict)
    thresholds: Dict[str, float] = dataclasses.field(default_factory=lambda: dict(THRESHOLDS))
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- figures -------------------------------------------------------------------------------
    @property
    def matched_fraction(self) -> float:
        return self.matched / self.reference_instances if self.reference_instances else 1.0

    @property
    def label_agreement(self) -> float:
        return self.same_label / self.matched if self.matched else 0.0

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.frame_ious)) if self.frame_ious else 0.0

    @property
    def worst_iou(self) -> float:
        return float(np.min(self.frame_ious)) if self.frame_ious else 0.0

    @property
    def passed(self) -> bool:
        if self.reference_instances == 0 and self.candidate_instances == 0:
            return True
        return (self.matched_fraction >= self.thresholds["matched_fraction"]
                and self.mean_iou >= self.thresholds["mean_iou"]
                and self.label_agreement >= self.thresholds["label_agreement"])

    def verdict(self) -> str:
        """One line: PASS/FAIL and the figures against the thresholds."""
        th = self.thresholds
        ds = self.score_deltas
        return (f"{'PASS' if self.passed else 'FAIL'}: {self.matched}/{self.reference_instances} "
                f"instances matched ({100 * self.matched_fraction:.1f} %, need "
                f">= {100 * th['matched_fraction']:.0f} %), labels agree "
                f"{100 * self.label_agreement:.1f} % (>= {100 * th['label_agreement']:.0f} %), "
                f"mask IoU mean {self.mean_iou:.3f} (>= {th['mean_iou']:.2f}) worst "
                f"{self.worst_iou:.3f}, |d score| mean {np.mean(ds) if ds else 0:.3g} max "
                f"{np.max(ds) if ds else 0:.3g}, tracks {self.candidate_tracks} vs "
                f"{self.reference_tracks}, {self.span_differs} spans differ")

    def to_dict(self) -> Dict[str, Any]:
        ds = self.score_deltas
        return {
            "verdict": self.verdict(), "passed": self.passed, "thresholds": dict(self.thresholds),
            "match_iou": MATCH_IOU,
            "reference_instances": self.reference_instances,
            "candidate_instances": self.candidate_instances, "matched": self.matched,
            "matched_fraction": self.matched_fraction, "label_agreement": self.label_agreement,
            "mask_iou_mean": self.mean_iou, "mask_iou_worst": self.worst_iou,
            "video_iou_mean": float(np.mean(self.video_ious)) if self.video_ious else 0.0,
            "score_delta_mean": float(np.mean(ds)) if ds else 0.0,
            "score_delta_max": float(np.max(ds)) if ds else 0.0,
            "tracks": {"reference": self.reference_tracks, "candidate": self.candidate_tracks,
                       "matched_spans_differ": self.span_differs},
            "stages": self.stages, **self.info}

    def stage_lines(self) -> List[str]:
        """``stage output: max-rel x, mean-rel y`` lines."""
        return [f"  {s} {o}: max-rel {v['max_rel']:.3g}, mean-rel {v['mean_rel']:.3g}"
                for s, outs in self.stages.items() for o, v in outs.items()]


def video_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Video mask IoU of every pair: (Sa, T, H, W) x (Sb, T, H, W) bool -> (Sa, Sb) float64,
    intersections and unions summed over all frames (as YouTube-VIS / OVIS evaluate); two
    empty masks have IoU 1. Frame by frame, so the float temporaries stay (S, H*W)."""
    sa, sb = a.shape[0], b.shape[0]
    inter = np.zeros((sa, sb), np.float64)
    area_a = a.reshape(sa, -1).sum(1).astype(np.float64)
    area_b = b.reshape(sb, -1).sum(1).astype(np.float64)
    for t in range(a.shape[1]):
        fa = a[:, t].reshape(sa, -1).astype(np.float32)
        fb = b[:, t].reshape(sb, -1).astype(np.float32)
        inter += fa @ fb.T
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def match_pairs(ref_masks: np.ndarray, ref_labels: np.ndarray, cand_masks: np.ndarray,
                cand_labels: np.ndarray, label_bonus: float):
    """Hungarian pairing (``scipy.optimize.linear_sum_assignment``) of two instance sets that
    maximises video mask IoU plus ``label_bonus`` for an equal label: a large bonus (2: more
    than any IoU) pairs equal labels first, a tiny one (1e-3) only breaks IoU ties.

    Args: masks bool (S, T, H, W) of the same (T, H, W); labels int (S,).
    Returns ``(rows, cols, iou, same)``: the pairs' indices into ref / cand, the (Sr, Sc) IoU
    matrix (:func:`video_iou`) and the (Sr, Sc) equal-label matrix."""
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415

    iou = video_iou(ref_masks, cand_masks)
    same = np.asarray(ref_labels)[:, None] == np.asarray(cand_labels)[None, :]
    rows, cols = linear_sum_assignment(-(iou + label_bonus * same))
    return rows, cols, iou, same


def _span(m: np.ndarray):
    on = np.flatnonzero(m.reshape(m.shape[0], -1).any(1))
    return (int(on[0]), int(on[-1])) if on.size else (-1, -1)


def compare_instances(ref: InstanceSet, cand: InstanceSet,
                      report: Optional[AccuracyReport] = None) -> AccuracyReport:
    """Match one video's candidate instances to the reference's and add the figures to
    ``report`` (a new one if None). Masks must have the same (T, H, W).

    Raises InputError when the two sets cover different frame counts or sizes."""
    rep = report or AccuracyReport()
    if ref.masks.shape[1:] != cand.masks.shape[1:] and len(ref.masks) and len(cand.masks):
        raise InputError(f"the two results cover different videos: masks "
                         f"{ref.masks.shape[1:]} vs {cand.masks.shape[1:]}")
    rep.reference_instances += len(ref.labels)
    rep.candidate_instances += len(cand.labels)
    rep.reference_tracks += int(ref.num_tracks)
    rep.candidate_tracks += int(cand.num_tracks)
    if len(ref.labels) == 0 or len(cand.labels) == 0:
        return rep
    rows, cols, iou, same = match_pairs(ref.masks, ref.labels, cand.masks, cand.labels, 1e-3)
    for i, j in zip(rows, cols):
        if iou[i, j] < MATCH_IOU:
            continue
        rep.matched += 1
        rep.same_label += int(same[i, j])
        rep.video_ious.append(float(iou[i, j]))
        rep.score_deltas.append(abs(float(cand.scores[j]) - float(ref.scores[i])))
        a, b = ref.masks[i], cand.masks[j]
        for t in range(a.shape[0]):
            u = np.logical_or(a[t], b[t]).sum()
            if u:
                rep.frame_ious.append(float(np.logical_and(a[t], b[t]).sum() / u))
        if _span(a) != _span(b):
            rep.span_differs += 1
    return rep


def _rel_errors(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]
                ) -> Dict[str, Dict[str, float]]:
    out = {}
    for name, r in ref.items():
        r64 = np.asarray(r, np.float64)
        g64 = np.asarray(got[name], np.float64)
        scale = float(np.abs(r64).max()) if r64.size else 0.0
        d = np.abs(g64 - r64)
        out[name] = {"max_rel": float(d.max() / scale) if scale > 0 and d.size else 0.0,
                     "mean_rel": float(d.mean() / scale) if scale > 0 and d.size else 0.0}
    return out


class _Recorder:
    """Wraps a backend; keeps (host copies of) the inputs of the first call of each stage."""

    def __init__(self, backend):
        self._b = backend
        self.inputs: Dict[str, Dict[str, np.ndarray]] = {}

    def __getattr__(self, name):
        return getattr(self._b, name)

    def _keep(self, stage, inputs):
        if stage not in self.inputs:
            self.inputs[stage] = {k: np.array(self._b.to_host(v)) for k, v in inputs.items()}

    def run_resident(self, stage, inputs, fetch=(), **kw):
        self._keep(stage, inputs)
        return self._b.run_resident(stage, inputs, fetch=fetch, **kw)

    def run(self, stage, inputs):
        self._keep(stage, inputs)
        return self._b.run(stage, inputs)


def stage_errors(candidate, reference, inputs: Mapping[str, Mapping[str, np.ndarray]]
                 ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Relative errors (max and mean |cand - ref| / max |ref|) of every output of every stage,
    both backends fed the same ``inputs`` (stage -> input name -> array; recorded from the
    reference's pipeline run, so every stage sees real inputs)."""
    out = {}
    for stage, feed in inputs.items():
        out[stage] = _rel_errors(candidate.run(stage, feed), reference.run(stage, feed))
    return out


def compare_bundles(candidate: os.PathLike | str, reference: os.PathLike | str,
                    videos: Sequence[os.PathLike | str], *, threads: Optional[int] = None,
                    max_frames: Optional[int] = None, stages: bool = True,
                    progress: Optional[Callable[[str], None]] = None) -> AccuracyReport:
    """Run ``videos`` through both bundles (ONNX Runtime CPU) and compare (module docstring).

    Args:
        candidate, reference: bundle folders (the reference is normally the fp32 bundle).
        videos: video files / frame folders (as ``dvis-trt run`` takes them).
        threads: ONNX Runtime intra-op threads per session.
        max_frames: use only the first ``max_frames`` frames of each video.
        stages: also measure per-stage errors (on the first video's recorded stage inputs).
    Raises:
        InputError: no videos, bundles of different configs; BundleError / DependencyError
        from loading the bundles.
    """
    from dvis_trt.runtime.inputs import discover_inputs  # noqa: PLC0415
    from dvis_trt.runtime.runner import Runner  # noqa: PLC0415

    say = progress or (lambda line: None)
    if not videos:
        raise InputError("the accuracy report needs a video: pass one or more videos / frame "
                         "folders")
    jobs, _ = discover_inputs([Path(v) for v in videos])
    ref_r = Runner(reference, "ort", threads=threads, quiet=True, providers="cpu")
    cand_r = Runner(candidate, "ort", threads=threads, quiet=True, providers="cpu")
    try:
        if ref_r.manifest.config.to_dict() != cand_r.manifest.config.to_dict():
            raise InputError(f"{candidate} and {reference} were exported from different "
                             "configs; compare a bundle with the fp32 bundle of the same model")
        rep = AccuracyReport()
        per_video = []
        recorder = _Recorder(ref_r.backend) if stages else None
        if recorder is not None:
            ref_r.pipeline.backend = recorder
        for job in jobs:
            frames = []
            for k, f in enumerate(job.open().iter_frames()):
                if max_frames is not None and k >= max_frames:
                    break
                frames.append(f.rgb)
            if not frames:
                raise InputError(f"{job.path or job.name} has no frames")
            t0 = time.perf_counter()
            res_ref = ref_r.pipeline.run_video(frames)
            t1 = time.perf_counter()
            if recorder is not None:  # one video's stage inputs are enough
                ref_r.pipeline.backend = recorder._b
            res_cand = cand_r.pipeline.run_video(frames)
            t2 = time.perf_counter()
            before = (rep.matched, rep.reference_instances)
            compare_instances(instances_from_result(res_ref), instances_from_result(res_cand), rep)
            per_video.append({"video": str(job.path or job.name), "frames": len(frames),
                              "matched": rep.matched - before[0],
                              "reference_instances": rep.reference_instances - before[1],
                              "seconds": {"reference": round(t1 - t0, 3),
                                          "candidate": round(t2 - t1, 3)}})
            say(f"{job.name}: {len(frames)} frames, {per_video[-1]['matched']}/"
                f"{per_video[-1]['reference_instances']} matched (reference {t1 - t0:.1f} s, "
                f"candidate {t2 - t1:.1f} s)")
        if recorder is not None:
            rep.stages = stage_errors(cand_r.backend, ref_r.backend, recorder.inputs)
        rep.info = {"candidate": {"bundle": str(cand_r.manifest.root),
                                  "precision": cand_r.manifest.precision},
                    "reference": {"bundle": str(ref_r.manifest.root),
                                  "precision": ref_r.manifest.precision},
                    "videos": per_video, "backend": "ort cpu"}
        return rep
    finally:
        ref_r.close()
        cand_r.close()


def write_report(report: AccuracyReport, path: os.PathLike | str) -> Path:
    """Write ``report.to_dict()`` as JSON atomically; returns the path."""
    from dvis_trt.fileio import atomic_write_json, strict_json  # noqa: PLC0415
    return atomic_write_json(Path(path), strict_json(report.to_dict()), indent=2)




def load_report(path: os.PathLike | str) -> Dict[str, Any]:
    """The JSON of a written report."""
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)
