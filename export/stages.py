"""The five exported stages as ``nn.Module`` wrappers around one eager :class:`DvisDaqOffline`.

Each wrapper's ``forward`` takes exactly the stage inputs of DESIGN.md's table, positionally in
the order of :data:`dvis_trt.runtime.bundle.STAGE_SPECS`, and returns exactly its outputs, in
that order (the exporter names graph I/O from the same table; the torch backend and
``dvis-trt check`` bind by it). The wrappers own no parameters: they hold references to the
model's children, so one checkpoint load serves the eager model, every stage and the export.

===============  ================================================  ===============================
stage            wraps                                             official semantics
===============  ================================================  ===============================
segmenter        ``Segmenter(backbone, sem_seg_head)`` minus its     backbone + ``sem_seg_head`` +
                 ``pred_masks`` output                              the pooling half of
                                                                    ``get_mask_pos_embed``
tracker_first    ``tracker.forward_first``                          ``VideoInstanceCutter.inference``
                                                                    branch ``i == 0``
tracker_step     ``tracker.forward_step``                           same, ``else`` branch
refiner          ``refiner.forward_stage``                          ``TemporalRefiner.forward`` +
                                                                    ``pred_class``
mask_head        ``refiner.mask_head``                              ``windows_prediction`` einsum
===============  ================================================  ===============================

:func:`eager_runner` adapts the modules to the ``run(stage, inputs) -> outputs`` callable that
:func:`dvis_trt.export.sample_inputs.sample_stage_inputs` chains to make example inputs.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from dvis_trt.runtime.bundle import EXPORT_STAGE_NAMES, ONLINE_STAGE_NAMES, STAGE_SPECS

__all__ = ["SegmenterStage", "TrackerFirstStage", "TrackerStepStage", "RefinerStage",
           "MaskHeadStage", "TrackerMasksStage", "build_stages", "stage_input_names", "stage_output_names",
           "run_stage_eager", "eager_runner"]


def stage_input_names(stage: str) -> Tuple[str, ...]:
    """Input names of ``stage`` in positional order (``STAGE_SPECS``)."""
    return tuple(t.name for t in STAGE_SPECS[stage][0])


def stage_output_names(stage: str) -> Tuple[str, ...]:
    """Output names of ``stage`` in return order (``STAGE_SPECS``)."""
    return tuple(t.name for t in STAGE_SPECS[stage][1])


class SegmenterStage(nn.Module):
    """``images`` (T,3,Hp,Wp) f32 -> ``mask_features`` (T,D,h,w), ``frame_embeds`` (T,Q,C),
    ``pred_logits`` (T,Q,K+1), ``mask_pooled`` (T,Q,D); h = Hp/4, w = Wp/4.

    ``images``: RGB, ``(x - PIXEL_MEAN) / PIXEL_STD``, zero-padded bottom/right to multiples
    of 32. The segmenter's ``pred_masks`` are consumed inside the stage (``mask_pooled``) and
    not exported: nothing downstream needs them.
    """

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        mask_features, frame_embeds, pred_logits, _pred_masks, mask_pooled = self.segmenter(images)
        return mask_features, frame_embeds, pred_logits, mask_pooled


class TrackerFirstStage(nn.Module):
    """``frame_embeds`` (Q,C), ``mask_features`` (D,h,w) -> ``embeds`` (Q,C),
    ``pred_logits`` (Q,K+1), ``track_pos`` (Q,C) (``VideoInstanceCutter.forward_first``)."""

    def __init__(self, tracker: nn.Module):
        super().__init__()
        self.tracker = tracker

    def forward(self, frame_embeds: Tensor, mask_features: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.tracker.forward_first(frame_embeds, mask_features)


class TrackerStepStage(nn.Module):
    """``track_queries`` (tQ,C), ``track_pos`` (tQ,C), ``frame_embeds`` (Q,C),
    ``mask_pooled`` (Q,D), ``mask_features`` (D,h,w), ``slot_index`` int64 (tQ+S) ->
    ``embeds`` (tQ+N,C), ``pred_logits`` (tQ+N,K+1), ``slot_logits`` (tQ,K+1),
    ``track_pos_out`` (tQ+N,C) (``VideoInstanceCutter.forward_step``; tQ may be 0)."""

    def __init__(self, tracker: nn.Module):
        super().__init__()
        self.tracker = tracker

    def forward(self, track_queries: Tensor, track_pos: Tensor, frame_embeds: Tensor,
                mask_pooled: Tensor, mask_features: Tensor, slot_index: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.tracker.forward_step(track_queries, track_pos, frame_embeds, mask_pooled,
                                         mask_features, slot_index)


class RefinerStage(nn.Module):
    """``instance_embeds`` (L,Qr,C), ``frame_embeds`` (L,Q,C) -> ``pred_logits`` (Qr,K+1),
    ``mask_embed`` (L,Qr,D) (``TemporalRefiner.forward_stage``)."""

    def __init__(self, refiner: nn.Module):
        super().__init__()
        self.refiner = refiner

    def forward(self, instance_embeds: Tensor, frame_embeds: Tensor) -> Tuple[Tensor, Tensor]:
        return self.refiner.forward_stage(instance_embeds, frame_embeds)


class MaskHeadStage(nn.Module):
    """``mask_embed`` (t,Qs,D), ``mask_features`` (t,D,h,w) -> ``pred_masks`` (Qs,t,h,w)
    logits (``TemporalRefiner.mask_head``)."""

    def __init__(self, refiner: nn.Module):
        super().__init__()
        self.refiner = refiner

    def forward(self, mask_embed: Tensor, mask_features: Tensor) -> Tensor:
        return self.refiner.mask_head(mask_embed, mask_features)


class TrackerMasksStage(nn.Module):
    """``embeds`` (tM,C), ``mask_features`` (D,h,w) -> ``pred_masks`` (tM,h,w) logits: the
    tracker's own masks of the tracks it stored this frame (online mode;
    ``VideoInstanceCutter.forward_masks_folded``)."""

    def __init__(self, tracker: nn.Module):
        super().__init__()
        self.tracker = tracker

    def forward(self, embeds: Tensor, mask_features: Tensor) -> Tensor:
        return self.tracker.forward_masks_folded(embeds, mask_features)


def build_stages(model: nn.Module) -> Dict[str, nn.Module]:
    """The five stage modules of a :class:`~dvis_trt.export.model.dvis_daq.DvisDaqOffline`,
    keyed by stage name in pipeline order, in eval mode, sharing the model's parameters.

    Also copies the segmenter's query features (``sem_seg_head.predictor.query_feat.weight``)
    into the tracker's ``seg_query_feat`` buffer (official ``frames_info["seg_query_feat"]``),
    so ``tracker_step`` is ready to run and exports them as a graph constant. Call it again
    after loading another checkpoint into ``model``.

    An online model (no ``refiner``, :class:`~dvis_trt.export.model.dvis_daq_online.DvisDaqOnline`)
    gets the stages of :data:`~dvis_trt.runtime.bundle.ONLINE_STAGE_NAMES` only; an offline one
    all of :data:`~dvis_trt.runtime.bundle.EXPORT_STAGE_NAMES` (``tracker_masks`` included,
    so one bundle serves both modes).

    Raises:
        ValueError: ``model`` lacks one of the children ``backbone``, ``sem_seg_head``,
            ``tracker``.
    """
    for child in ("backbone", "sem_seg_head", "tracker"):
        if not isinstance(getattr(model, child, None), nn.Module):
            raise ValueError(f"build_stages: the model has no '{child}' module; pass a "
                             "DvisDaqOffline (dvis_trt.export.model.build.build_model)")
    model.tracker.set_seg_query_feat(model.sem_seg_head.predictor.query_feat.weight)
    if hasattr(model, "segmenter") and callable(model.segmenter):
        segmenter = model.segmenter()
    else:  # pragma: no cover - any model with the official children
        from .model.segmenter import Segmenter
        segmenter = Segmenter(model.backbone, model.sem_seg_head)
    stages = {
        "segmenter": SegmenterStage(segmenter),
        "tracker_first": TrackerFirstStage(model.tracker),
        "tracker_step": TrackerStepStage(model.tracker),
    }
    if isinstance(getattr(model, "refiner", None), nn.Module):
        stages["refiner"] = RefinerStage(model.refiner)
        stages["mask_head"] = MaskHeadStage(model.refiner)
    stages["tracker_masks"] = TrackerMasksStage(model.tracker)
    assert set(stages) in (set(EXPORT_STAGE_NAMES), set(ONLINE_STAGE_NAMES))
    return {k: v.eval() for k, v in stages.items()}


@torch.no_grad()
def run_stage_eager(module: nn.Module, stage: str, inputs: Mapping[str, np.ndarray]
                    ) -> Dict[str, np.ndarray]:
    """Run one stage module on numpy inputs (by name) and return numpy outputs by name.

    Raises:
        ValueError: an input name of the stage is missing from ``inputs``.
    """
    names = stage_input_names(stage)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"stage '{stage}': inputs {missing} are missing (need {list(names)})")
    args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names]
    out = module(*args)
    if isinstance(out, Tensor):
        out = (out,)
    return {n: o.detach().cpu().numpy() for n, o in zip(stage_output_names(stage), out)}


def eager_runner(stages: Mapping[str, nn.Module]):
    """``run(stage, inputs) -> outputs`` over numpy dicts with the eager stage modules (the
    runner :func:`dvis_trt.export.sample_inputs.sample_stage_inputs` takes)."""
    def run(stage: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return run_stage_eager(stages[stage], stage, inputs)
    return run
