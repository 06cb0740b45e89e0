"""DVIS-DAQ's per-frame masked-attention decoder (the segmenter's "predictor").

Port of the official ``VideoMultiScaleMaskedTransformerDecoder_dvisPlus``
(``dvis_Plus/video_mask2former_transformer_decoder.py``, built on
``mask2former_video/.../video_mask2former_transformer_decoder.py``) at inference:

* 2-D sine position embedding per level (the dvisPlus class replaces the parent's 3-D one),
  ``input_proj`` (identity when ``in_channels == hidden_dim`` and not enforced, else a 1x1
  conv), ``level_embed``;
* learnable ``query_feat`` / ``query_embed``;
* per layer: masked cross-attention (mask from the previous prediction, bilinear-resized to
  the level's size, ``sigmoid < 0.5`` blocked, fully blocked rows unblocked), self-attention,
  FFN; then ``decoder_norm`` + ``class_embed`` + ``mask_embed`` heads.

Frames are the batch: at inference the dvisPlus decoder attends within each frame only
(memory ``(h*w, T, C)``, queries ``(Q, T, C)``), so frames are independent.
Only the last layer's predictions are returned (the official auxiliary outputs feed losses
only); ``reid_embed`` is built so checkpoints load strictly but is never called.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer, masked_attention_bias
from .position_encoding import PositionEmbeddingSine


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2 "XavierFill" as fvcore's ``c2_xavier_fill``: kaiming-uniform (a=1), bias 0."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class VideoMultiScaleMaskedTransformerDecoder_dvisPlus(nn.Module):
    """The dvisPlus frame decoder (official class of the same name), inference path.

    Keyword args (official config key in brackets; R50 OVIS value):
        in_channels: channels of the multi-scale features [SEM_SEG_HEAD.CONVS_DIM; 256].
        num_classes: K, foreground classes [SEM_SEG_HEAD.NUM_CLASSES; 25]; logits have K+1.
        hidden_dim: C [MASK_FORMER.HIDDEN_DIM; 256].
        num_queries: Q [MASK_FORMER.NUM_OBJECT_QUERIES; 100].
        nheads: attention heads [MASK_FORMER.NHEADS; 8].
        dim_feedforward: FFN width [MASK_FORMER.DIM_FEEDFORWARD; 2048].
        dec_layers: number of decoder layers = ``MASK_FORMER.DEC_LAYERS - 1`` (the official
            ``from_config`` subtracts one; 9 for the R50 OVIS config).
        pre_norm: [MASK_FORMER.PRE_NORM; False].
        mask_dim: channels of ``mask_features`` [SEM_SEG_HEAD.MASK_DIM; 256].
        enforce_input_project: [MASK_FORMER.ENFORCE_INPUT_PROJ; False].
        num_reid_head_layers: [MASK_FORMER.NUM_REID_HEAD_LAYERS; 3]; 0 gives an Identity.
        reid_hidden_dim: [MASK_FORMER.REID_HIDDEN_DIM; 256].
        num_feature_levels: always 3 in the official code.

    Raises ValueError on inconsistent sizes (e.g. ``hidden_dim`` not divisible by ``nheads``
    or odd ``hidden_dim``).
    """

    def __init__(self, *, in_channels: int, num_classes: int, hidden_dim: int = 256,
                 num_queries: int = 100, nheads: int = 8, dim_feedforward: int = 2048,
                 dec_layers: int = 9, pre_norm: bool = False, mask_dim: int = 256,
                 enforce_input_project: bool = False, num_reid_head_layers: int = 3,
                 reid_hidden_dim: int = 256, num_feature_levels: int = 3):
        super().__init__()
        if hidden_dim % 2 or hidden_dim % nheads:
            raise ValueError(f"predictor: hidden_dim ({hidden_dim}) must be even and divisible "
                             f"by nheads ({nheads})")
        if dec_layers < 0 or num_feature_levels < 1:
            raise ValueError(f"predictor: dec_layers ({dec_layers}) must be >= 0 and "
                             f"num_feature_levels ({num_feature_levels}) >= 1")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.mask_dim = mask_dim
        self.num_feature_levels = num_feature_levels

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(dec_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm))
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm))
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward=dim_feedforward, dropout=0.0,
                         normalize_before=pre_norm))

        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)

        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

        # Present in the checkpoint (re-id branch used in training); never called here.
        if num_reid_head_layers > 0:
            self.reid_embed = MLP(hidden_dim, reid_hidden_dim, hidden_dim, num_reid_head_layers)
            for layer in self.reid_embed.layers:
                c2_xavier_fill(layer)
        else:
            self.reid_embed = nn.Identity()

    # ------------------------------------------------------------------ heads
    def _mask_logits(self, output: Tensor, mask_features: Tensor):
        """decoder_norm + mask_embed + dot product with the mask features.

        output (Q, T, C); mask_features (T, mask_dim, h, w) -> (normed (T, Q, C),
        masks (T, Q, h, w)). The official ``einsum("bqc,bchw->bqhw")`` as a batched matmul.
        """
        normed = self.decoder_norm(output).transpose(0, 1)
        mask_embed = self.mask_embed(normed)
        t, c, h, w = mask_features.shape
        masks = torch.matmul(mask_embed, mask_features.flatten(2)).reshape(t, -1, h, w)
        return normed, masks

    def _attn_bias(self, masks: Tensor, size: Sequence[int]) -> Tensor:
        """(T, Q, h, w) mask logits -> additive (T*nheads, Q, H_l*W_l) bias for level size."""
        resized = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return masked_attention_bias(resized.flatten(2), self.num_heads)

    # ---------------------------------------------------------------- forward
    def forward(self, multi_scale_features: List[Tensor], mask_features: Tensor) -> Dict[str, Tensor]:
        """Decode every frame independently.

        Args:
            multi_scale_features: ``num_feature_levels`` tensors (T, in_channels, h_l, w_l)
                float32, coarsest first (the pixel decoder's order: strides 32, 16, 8).
            mask_features: (T, mask_dim, h, w) float32 (stride 4).
        Returns:
            dict with ``pred_logits`` (T, Q, K+1), ``pred_masks`` (T, Q, h, w) logits,
            ``pred_embds`` (T, Q, C) = decoder output after ``decoder_norm`` (the official
            ``pred_embds`` rearranged from (1, C, T, Q)).
        Raises:
            ValueError: wrong number of levels or a mask_features that is not 4-D.
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(f"predictor: expected {self.num_feature_levels} feature levels, "
                             f"got {len(multi_scale_features)}")
        if mask_features.dim() != 4:
            raise ValueError(f"predictor: mask_features must be (T, C, h, w), got "
                             f"{tuple(mask_features.shape)}")

        src: List[Tensor] = []
        pos: List[Tensor] = []
        sizes = []
        for i, x in enumerate(multi_scale_features):
            sizes.append(x.shape[-2:])
            # The embedding does not depend on the frame (mask=None): compute it once,
            # (h_l*w_l, 1, C), and let the addition broadcast over frames.
            pos.append(self.pe_layer(x[:1]).flatten(2).permute(2, 0, 1))
            feat = self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(feat.permute(2, 0, 1))

        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).expand(-1, bs, -1)
        output = self.query_feat.weight.unsqueeze(1).expand(-1, bs, -1)

        embeds, masks = self._mask_logits(output, mask_features)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            bias = self._attn_bias(masks, sizes[level])
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=bias, memory_key_padding_mask=None,
                pos=pos[level], query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](
                output, tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
            embeds, masks = self._mask_logits(output, mask_features)

        # Only the last layer's heads matter at inference (earlier ones feed aux losses).
        return {"pred_logits": self.class_embed(embeds), "pred_masks": masks, "pred_embds": embeds}
