"""Host memory of a clip, by design: the cost model behind ``--clip-frames auto`` (no torch).

Only the refiner looks at a whole clip, so every array that grows with the clip length ``L``
lives between the segmenter and the mask head of one clip (:meth:`OfflinePipeline.process_clip`).
:class:`ClipCost` counts them (bytes; float32 unless said), from the bundle's config and the
video's size:

per frame of the clip (linear in ``L``)
    resized frame ``h*w*3`` (uint8) - mask features ``D*Hp/4*Wp/4`` - the segmenter's frame
    embeds, logits and pooled masks ``Q*(2C+K+1)`` - the frame-linked copies (``minvis_link``)
    ``Q*(C+K+1)`` - the track hub's per-frame records of live tracks ``T_live*(C+K+1)`` - the
    refiner's inputs and outputs ``2*N*C`` and its per-frame activations (object self-attention
    ``heads*N*N``, cross-attention to the frame's queries ``heads*N*Q``, FFN ``N*F``, a few
    ``N*C`` temporaries) - the selected tracks' dense embeds ``topK*C`` (selected *before* they
    are made dense: :meth:`TrackHub.clip_tracks`);
per frame squared (the refiner's time self-attention)
    ``heads*N*L*L`` scores, softmax and its copy: 3 of them alive at once;
fixed
    the stage weights as loaded (twice the ONNX files: ORT keeps pre-packed copies), one
    segmenter window of activations, the Python/NumPy/ONNX Runtime/PyAV runtime itself.

Per frame of the *video* (not of the clip) the results grow too (``MAX_NUM`` RLE strings a
frame); :meth:`ClipCost.results_bytes` counts them so a budget is never promised that the
results alone would break.

:func:`plan_clip_frames` picks the longest clip whose estimate fits ``--memory-gb`` (total
peak, fixed part included) and says when even the shortest clip cannot fit. The model uses
only config values and sizes, never a measurement of this process, so the clips -- and hence the
results -- are the same on every machine for the same video and options.

Constants for what a manifest does not record (attention heads, FFN width) are the official
R50/ViT-L values (``NHEADS`` 8, ``DIM_FEEDFORWARD`` = 8 x hidden); smaller models are
over-estimated, never under-estimated. ``benchmarks/memory_auto.py`` measures the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["ClipCost", "plan_clip_frames", "RUNTIME_BASE_BYTES"]

#: Resident size of the Python process with numpy, scipy, PyAV, ONNX Runtime and the
#: runtime imported, before any session (measured: 150-190 MB on Linux x86-64).
RUNTIME_BASE_BYTES = 190 << 20
_F32 = 4
_HEADS = 8          # official MASK_FORMER.NHEADS (R50 / ViT-L configs)
_FFN_PER_C = 8      # official DIM_FEEDFORWARD 2048 = 8 x HIDDEN_DIM 256
_ATTN_COPIES = 3    # scores, softmax output, and one temporary alive at the peak
#: live tracks per frame, as a multiple of NUM_NEW_INS (births + misses). The hub's records add
#: up tQ over the clip's frames, so the mean matters: measured on the R50 sparse-tracks test
#: weights (benchmarks/memory_auto.py, 250-1,000 frames) mean tQ 41 = 0.41 x N, with bursts
#: to 683 that die out after 8 misses. A config value, not a measurement of this run, so the
#: clip plan stays the same on every machine.
_LIVE_TRACKS = 2


@dataclass(frozen=True)
class ClipCost:
    """Bytes of host memory as a function of the clip length ``L`` (see the module doc).

    Attributes:
        fixed: bytes independent of ``L`` (runtime, weights, one segmenter window).
        per_frame: bytes per frame of the clip.
        per_frame2: bytes per frame squared (the refiner's time attention).
        per_video_frame: bytes per frame of the whole video (the results).
    """

    fixed: float
    per_frame: float
    per_frame2: float
    per_video_frame: float = 0.0

    @classmethod
    def for_video(cls, config, size_hw: tuple, resized_hw: tuple, padded_hw: tuple, *,
                  window: int = 5, weight_bytes: int = 0) -> "ClipCost":
        """The cost model of one video.

        Args:
            config: the bundle's :class:`~dvis_trt.runtime.bundle.InferenceConfig`.
            size_hw: original frame (H, W); resized_hw: after the resize rule (h, w);
                padded_hw: padded input (Hp, Wp).
            window: frames per segmenter call.
            weight_bytes: total size of the bundle's stage files (0: unknown).
        """
        c, q, n, d, k = (config.hidden_dim, config.num_queries, config.num_new_ins,
                         config.mask_dim, config.num_classes)
        h0, w0 = size_hw
        h, w = resized_hw
        hp, wp = padded_hw
        live = _LIVE_TRACKS * n
        topk = min(config.offline_topk_num, n)
        per_frame = (
            h * w * 3                                          # resized frame, uint8
            + d * (hp // 4) * (wp // 4) * _F32                 # mask features
            + q * (2 * c + k + 1) * _F32                       # frame embeds, logits, pooled
            + q * (c + k + 1) * _F32                           # frame-linked copies
            + live * (c + k + 1) * _F32                        # track hub records
            + topk * c * _F32                                  # selected tracks, dense
            + 2 * n * c * _F32                                 # refiner inputs / mask embeds
            + (_HEADS * n * (n + q) * 2 + n * _FFN_PER_C * c + 6 * n * c) * _F32
        )
        per_frame2 = _ATTN_COPIES * _HEADS * n * _F32
        # one segmenter window: the input, stride-2/4 feature maps (a ResNet stem and res2,
        # at most 256 channels at stride 4 alive twice) and the mask features it returns
        seg_frame = (3 * hp * wp + 64 * (hp // 2) * (wp // 2) * 2
                     + 256 * (hp // 4) * (wp // 4) * 4) * _F32
        fixed = RUNTIME_BASE_BYTES + 2 * weight_bytes + window * seg_frame
        # results: MAX_NUM RLEs a frame (dict + counts string, about 2 bytes per row+column
        # run boundary), held twice (the video's results and the copy the merge reads back)
        per_video = 2 * config.max_num * (360 + 2 * (h0 + w0))
        return cls(float(fixed), float(per_frame), float(per_frame2), float(per_video),
                   float(config.max_num))

    #: instances a clip adds to the results (``MAX_NUM``); each holds one slot per video frame
    #: (``None`` outside its clip) in three lists (merge, results, merge read-back)
    instances_per_clip: float = 0.0

    def clip_bytes(self, frames: int) -> float:
        """Bytes that grow with a clip of ``frames`` frames."""
        return self.per_frame * frames + self.per_frame2 * frames * frames

    def results_bytes(self, video_frames: int, clip_frames: Optional[int] = None) -> float:
        """Bytes of the results of a ``video_frames``-frame video run in clips of
        ``clip_frames`` (None: one clip)."""
        n = max(int(video_frames), 0)
        clips = 1 if not clip_frames else -(-n // max(int(clip_frames), 1))
        return self.per_video_frame * n + 3 * 8 * self.instances_per_clip * clips * n

    def peak_bytes(self, clip_frames: int, video_frames: int) -> float:
        """Estimated peak: fixed + one clip + the results of the whole video."""
        return self.fixed + self.clip_bytes(min(clip_frames, video_frames or clip_frames)) + \
            self.results_bytes(video_frames, clip_frames)

    def max_frames(self, budget: float) -> int:
        """Longest clip whose :meth:`clip_bytes` fits ``budget`` bytes (0 if none)."""
        if budget <= 0:
            return 0
        a, b = self.per_frame2, self.per_frame
        if a <= 0:
            return int(budget // b) if b > 0 else 1 << 30
        return int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a))


def plan_clip_frames(cost: ClipCost, memory_bytes: float, num_frames: Optional[int], *,
                     min_frames: int = 1) -> tuple:
    """Clip length for ``--clip-frames auto``.

    Args:
        cost: the video's :class:`ClipCost`.
        memory_bytes: ``--memory-gb`` in bytes: the process's peak resident size to stay under.
        num_frames: the video's frame count (None: unknown, planned as if long).
        min_frames: the shortest clip worth running (the segmenter window).
    Returns:
        ``(clip_frames, fits)``: ``clip_frames`` None when the whole video fits as one clip
        (the official offline behaviour), else the clip length; ``fits`` False when even
        ``min_frames`` frames exceed the budget (the caller warns; ``min_frames`` is used).
    """
    min_frames = max(int(min_frames), 1)
    if num_frames is None:  # unknown length: the clip alone must fit (results not counted)
        fit = cost.max_frames(memory_bytes - cost.fixed)
        return (int(fit), True) if fit >= min_frames else (min_frames, False)
    n = int(num_frames)
    if cost.peak_bytes(n, n) <= memory_bytes:
        return None, True
    # the longest clip that fits: clip arrays grow with it, the results' per-clip slots
    # shrink with it; scan down from the clip that fits without results
    fit = min(cost.max_frames(memory_bytes - cost.fixed), n)
    best, best_bytes = min_frames, cost.peak_bytes(min_frames, n)
    while fit >= min_frames:
        need = cost.peak_bytes(fit, n)
        if need <= memory_bytes:
            return int(fit), True
        if need < best_bytes:
            best, best_bytes = fit, need
        fit = fit - max(1, fit // 64)
    # nothing fits: the clip length with the smallest estimate (very short clips multiply
    # the results' per-clip instances), and the caller warns
    return int(best), False
