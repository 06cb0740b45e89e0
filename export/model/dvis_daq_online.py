"""Eager DVIS-DAQ online: the per-frame PyTorch baseline and parity oracle of the online mode.

Follows the official ``dvis_daq/meta_architecture.py`` class ``DVIS_DAQ_online``:
``inference`` -> ``run_window_inference`` (segmenter, then ``VideoInstanceCutter.inference``
frame by frame; every track the hub stores at a frame keeps that frame's tracker logits and the
tracker's own mask, ``prediction`` on the last layer) -> the video-level tail (tracks shorter than
``NOISE_FRAME_NUM`` frames that do not reach the end are dropped, the score of a track is the
softmax of the *mean* of its per-frame logits, ``topk(MAX_NUM)`` over (track, class), masks
-1e4 where the track is absent) -> ``inference_video_vis`` (bilinear to the padded size, crop,
bilinear to the original size, ``> 0``). No refiner.

The online mode emits per frame what the hub stored at that frame (:class:`OnlineFrame`): track
ids, the frame's tracker logits, validity (``valid``: the tracker kept the track this frame;
``False`` for a track in its grace period before the kick-out after 8 misses) and the
tracker's mask. ``dvis_trt.runtime.online.video_level`` rebuilds the official video-level
output from those per-frame records, so per-frame and video-level parity use one run.

Deliberate differences (as in :mod:`.dvis_daq`): deterministic track ids (birth order), a sorted
top-K. Children carry the official state-dict prefixes (``backbone``, ``sem_seg_head``,
``tracker``, ``daq_criterion``), so official *online* checkpoints load strictly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvis_trt.runtime.preprocess import preprocess_frames

from dvis_trt.runtime.bundle.config import InferenceConfig

from .dvis_daq import DaqCriterionStub, TrackerLoop, track_frame


@dataclass
class OnlineFrame:
    """What the online model emits for one frame (n = tracks the hub stored at this frame).

    ``track_ids`` int64 (n,), ``logits`` float32 (n, K+1) the tracker's class logits of this
    frame, ``scores`` float32 (n,) max foreground softmax, ``labels`` int64 (n,) 0-based class,
    ``valid`` bool (n,), ``masks`` bool (n, H, W) at the original frame size.
    """

    index: int
    track_ids: np.ndarray
    logits: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    masks: np.ndarray


def resize_mask_logits(logits: Tensor, padded_size, image_size, out_size) -> Tensor:
    """Official ``inference_video_vis`` resize: (n, h, w) logits -> bool (n, H, W)."""
    if logits.shape[0] == 0:
        return torch.zeros((0, *out_size), dtype=torch.bool)
    up = F.interpolate(logits[None], size=tuple(padded_size), mode="bilinear", align_corners=False)
    up = up[:, :, :image_size[0], :image_size[1]]
    up = F.interpolate(up, size=tuple(out_size), mode="bilinear", align_corners=False)
    return up[0] > 0


class DvisDaqOnline(nn.Module):
    """DVIS-DAQ online, eager, one frame at a time (``step``) or a whole clip (``forward``).

    Args:
        backbone, sem_seg_head, tracker: the modules of :func:`~.build.build_model` (shared with
            an offline model, or built for an online config by :func:`~.build.build_online_model`).
        settings: inference values (thresholds, sizes).
    """

    def __init__(self, backbone: nn.Module, sem_seg_head: nn.Module, tracker: nn.Module,
                 settings: InferenceConfig):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.tracker = tracker
        self.daq_criterion = DaqCriterionStub(settings.num_classes)
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        """Forget the video: the next :meth:`step` is frame 0 (official ``resume=False``)."""
        self.loop = TrackerLoop()
        self.frame_index = 0

    def segmenter(self):
        from .segmenter import Segmenter
        seg = self.__dict__.get("_segmenter")
        if seg is None:
            seg = Segmenter(self.backbone, self.sem_seg_head)
            self.__dict__["_segmenter"] = seg
        return seg

    @torch.no_grad()
    def step(self, frame: np.ndarray) -> OnlineFrame:
        """Run one RGB uint8 frame (H, W, 3) of the current video; returns its :class:`OnlineFrame`."""
        s = self.settings
        h0, w0 = frame.shape[:2]
        images, (h, w) = preprocess_frames([frame], s.min_size_test, s.max_size_test,
                                           s.pixel_mean, s.pixel_std, s.size_divisibility,
                                           s.input_format)
        seg = dict(zip(self.segmenter().OUTPUT_NAMES, self.segmenter()(torch.from_numpy(images))))
        i = self.frame_index
        embeds, logits, stored = track_frame(
            self.tracker, self.sem_seg_head.predictor.query_feat.weight, s, self.loop, i,
            seg["frame_embeds"][0], seg["mask_features"][0], seg["mask_pooled"][0],
            seg["pred_logits"][0])
        self.frame_index += 1
        rows = torch.as_tensor([r for r, _, _ in stored], dtype=torch.long)
        lg = logits[rows] if len(stored) else logits.new_zeros((0, logits.shape[1]))
        mask_logits = self.tracker.forward_masks(embeds[rows], seg["mask_features"][0]) \
            if len(stored) else logits.new_zeros((0, 1, 1))
        masks = resize_mask_logits(mask_logits, images.shape[-2:], (h, w), (h0, w0))
        probs = F.softmax(lg, dim=-1)[:, :-1]
        scores, labels = probs.max(dim=-1) if len(stored) else (probs.new_zeros(0),
                                                                 torch.zeros(0, dtype=torch.long))
        return OnlineFrame(index=i, track_ids=np.asarray([t for _, t, _ in stored], np.int64),
                           logits=lg.float().numpy(), scores=scores.float().numpy(),
                           labels=labels.numpy().astype(np.int64),
                           valid=np.asarray([v for _, _, v in stored], bool),
                           masks=masks.numpy())

    @torch.no_grad()
    def forward(self, frames: Sequence[np.ndarray]) -> List[OnlineFrame]:
        """Run a whole video from frame 0; returns one :class:`OnlineFrame` per frame."""
        self.reset()
        return [self.step(f) for f in frames]
