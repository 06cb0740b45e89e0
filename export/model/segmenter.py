"""The ``segmenter`` stage: backbone + pixel decoder + frame decoder + mask pooling.

``SemSegHead`` follows the official ``MaskFormerHead``
(``mask2former/modeling/meta_arch/mask_former_head.py``) with
``TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"``: the backbone features go to the pixel
decoder (its ``forward_features``), whose multi-scale features and mask features go to the
predictor. ``Segmenter`` is the exported stage of DESIGN.md: normalised, padded images in,
per-frame decoder outputs plus the mask-pooled features the tracker's position embedding
needs (the first half of the official ``VideoInstanceCutter.get_mask_pos_embed``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn


def mask_pool(pred_masks: Tensor, mask_features: Tensor) -> Tensor:
    """Mean of the mask features over each query's predicted mask.

    Semantics of the pooling in the official ``VideoInstanceCutter.get_mask_pos_embed``
    (``dvis_daq/track_module.py``): pixels with ``sigmoid(mask) > 0.5`` are summed and divided
    by ``(their count + 1e-8)`` (a query with an empty mask gets zeros). The official code
    materialises a (T, Q, C, h, w) product; here it is one batched matmul
    ``(T, Q, h*w) @ (T, h*w, C)``.

    Args:
        pred_masks: (T, Q, h, w) float mask logits.
        mask_features: (T, C, h, w) float.
    Returns:
        (T, Q, C), dtype of ``mask_features`` (computed in float32).
    Raises:
        ValueError: if the shapes do not agree on T, h, w.
    """
    if pred_masks.dim() != 4 or mask_features.dim() != 4 \
            or pred_masks.shape[0] != mask_features.shape[0] \
            or pred_masks.shape[2:] != mask_features.shape[2:]:
        raise ValueError(f"mask_pool: expected pred_masks (T, Q, h, w) and mask_features "
                         f"(T, C, h, w) with equal T, h, w; got {tuple(pred_masks.shape)} and "
                         f"{tuple(mask_features.shape)}")
    # Accumulate in float32 whatever the input dtype: pixel counts reach h*w (> 2048, the
    # last exact fp16 integer) and 1e-8 underflows to 0 in fp16 (empty mask -> 0/0).
    # (The dtype tests are on Python values, so a float32 export carries no Cast nodes.)
    feats = mask_features if mask_features.dtype == torch.float32 else mask_features.float()
    seg = (pred_masks.sigmoid() > 0.5).to(torch.float32).flatten(2)              # (T, Q, hw)
    summed = torch.matmul(seg, feats.flatten(2).transpose(1, 2))                  # (T, Q, C)
    count = seg.sum(dim=-1, keepdim=True)                                         # (T, Q, 1)
    pooled = summed / (count + 1e-8)
    return pooled if pooled.dtype == mask_features.dtype else pooled.to(mask_features.dtype)


class SemSegHead(nn.Module):
    """Official ``MaskFormerHead`` at inference (children names = state-dict prefixes).

    Args:
        pixel_decoder: module with ``forward(features: dict) -> (mask_features (T, mask_dim,
            h, w), multi_scale_features [levels x (T, C, h_l, w_l)])`` (official
            ``MSDeformAttnPixelDecoder.forward_features``, minus its unused second output).
        predictor: module with ``forward(multi_scale_features, mask_features) -> dict``
            (see ``predictor.VideoMultiScaleMaskedTransformerDecoder_dvisPlus``).
        transformer_in_feature: only ``"multi_scale_pixel_decoder"`` (the Mask2Former /
            DVIS-DAQ setting) is supported; anything else raises ValueError.
    """

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module,
                 transformer_in_feature: str = "multi_scale_pixel_decoder"):
        super().__init__()
        if transformer_in_feature != "multi_scale_pixel_decoder":
            raise ValueError(f"SemSegHead: TRANSFORMER_IN_FEATURE {transformer_in_feature!r} is "
                             f"not supported; DVIS-DAQ uses 'multi_scale_pixel_decoder'")
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.transformer_in_feature = transformer_in_feature

    @property
    def num_classes(self) -> int:
        return self.predictor.num_classes

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Backbone features {"res2".."res5": (T, C_s, H/s, W/s)} -> the predictor's dict
        (``pred_logits`` (T,Q,K+1), ``pred_masks`` (T,Q,h,w), ``pred_embds`` (T,Q,C)) plus
        ``mask_features`` (T, mask_dim, h, w)."""
        mask_features, multi_scale_features = self.pixel_decoder(features)
        out = dict(self.predictor(multi_scale_features, mask_features))
        out["mask_features"] = mask_features
        return out


class Segmenter(nn.Module):
    """The ``segmenter`` stage (DESIGN.md): one window of frames through the image model.

    Children ``backbone`` and ``sem_seg_head`` carry the official state-dict prefixes.
    ``forward(images)`` returns the tuple named by :attr:`OUTPUT_NAMES`.
    """

    INPUT_NAMES = ("images",)
    OUTPUT_NAMES = ("mask_features", "frame_embeds", "pred_logits", "pred_masks", "mask_pooled")

    def __init__(self, backbone: nn.Module, sem_seg_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Run T frames (frames are the batch; each is processed independently).

        Args:
            images: (T, 3, Hp, Wp) float32, RGB, ``(x - PIXEL_MEAN) / PIXEL_STD``, zero-padded
                bottom/right so Hp and Wp are multiples of 32.
        Returns:
            mask_features (T, C, h, w) with h = Hp/4, w = Wp/4;
            frame_embeds (T, Q, C) (decoder output after ``decoder_norm``);
            pred_logits (T, Q, K+1); pred_masks (T, Q, h, w) logits;
            mask_pooled (T, Q, C) = :func:`mask_pool` of pred_masks over mask_features.
        Raises:
            ValueError: if ``images`` is not (T, 3, H, W).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Segmenter: images must be (T, 3, Hp, Wp), got {tuple(images.shape)}")
        features = self.backbone(images)
        out = self.sem_seg_head(features)
        mask_features = out["mask_features"]
        pred_masks = out["pred_masks"]
        return (mask_features, out["pred_embds"], out["pred_logits"], pred_masks,
                mask_pool(pred_masks, mask_features))
