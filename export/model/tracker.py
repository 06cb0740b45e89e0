"""The referring tracker of DVIS-DAQ (official ``dvis_daq/track_module.py``, ``VideoInstanceCutter``).

Only the per-frame network of ``VideoInstanceCutter.inference`` is ported here, as two stage
methods; everything that touches Python state (the track hub, validity thresholds, random
sequence ids, Hungarian matching) lives on the host (``dvis_trt.runtime.tracking``).

* :meth:`VideoInstanceCutter.forward_first` - the ``i == 0 and not resume`` branch (first frame
  of a video): the frame embeds refine themselves (cross-attention to the frame embeds
  without positions, self-attention, FFN per layer).
* :meth:`VideoInstanceCutter.forward_step` - the ``else`` branch: ``tQ`` track queries plus
  ``N`` copies of the learned new-instance embedding attend to the frame embeds, with
  position embeddings pooled from masks; the slot branch scores whether each track is still
  in the foreground.

Both return the raw last-layer output (``embeds``; the official hub stores
``ms_outputs[-1]``, *before* ``decoder_norm``), the last layer's class logits, and
``track_pos``: the ``pos_embed`` MLP applied to the mean of the *original* (un-projected) mask
features under ``sigmoid(mask) > 0.5``, where ``mask`` is the last layer's prediction against
``mask_feature_proj(mask_features)`` (official ``prediction`` + ``get_mask_pos_embed``).

Layout: stage inputs are unbatched (B == 1, as the official code asserts); inside, tensors are
sequence-first ``(L, 1, C)`` as ``nn.MultiheadAttention`` expects. ``tQ`` (number of live
tracks) is dynamic in the exported graph (no Python int derived from it); ``Q`` frame queries,
``N`` new-instance queries (``N == Q`` is required, the official code concatenates the ``N``
track-side queries with ``Q`` frame-query positions) and ``S`` background slots are fixed.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .layers import CrossAttentionLayer, FFNLayer, MLP, SelfAttentionLayer
from .slot_attention import SlotCrossAttentionLayer


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def pool_mask_features(mask_logits: Tensor, mask_features: Tensor) -> Tensor:
    """Mean of mask features under each binarised mask (first half of official ``get_mask_pos_embed``).

    Args:
        mask_logits: (n, h, w) or (n, h*w) float mask logits; a pixel belongs to a mask where
            ``sigmoid(logit) > 0.5`` (kept literally: in float32 this is not the same as
            ``logit > 0`` for tiny positive logits).
        mask_features: (C, h, w) float, the *original* (un-projected) mask features.
    Returns:
        (n, C) float: the official ``sum(features * mask) / (count + 1e-8)``, all zeros for an
        empty mask. Officially ``count`` is an int64 sum of booleans, so ``count + 1e-8`` is
        promoted to *float32*, where the 1e-8 vanishes for ``count >= 1``; for ``count == 0``
        the sum is 0. Dividing by ``max(count, 1)`` is therefore exactly the official result,
        and stays finite in fp16 (where ``0 + 1e-8`` would underflow to 0 and give NaN).
    """
    binary = (mask_logits.sigmoid() > 0.5).to(mask_features.dtype).flatten(1)   # n, hw
    feats = mask_features.flatten(1)                                              # C, hw
    total = torch.matmul(binary, feats.transpose(0, 1))                           # n, C
    return total / binary.sum(dim=1, keepdim=True).clamp_min(1.0)


class VideoInstanceCutter(nn.Module):
    """DVIS-DAQ referring tracker, inference stages (official ``VideoInstanceCutter``).

    Submodule names equal the official state-dict keys under ``tracker.``:
    ``transformer_{self,cross}_attention_layers``, ``transformer_ffn_layers``,
    ``slot_cross_attention_layers``, ``slot_ffn_layers``, ``decoder_norm``, ``class_embed``,
    ``pos_embed`` (MLP mask_dim->hidden->hidden, 3 layers), ``mask_embed`` (MLP
    hidden->hidden->mask_dim, 3 layers), ``mask_feature_proj`` (1x1 conv), ``new_ins_embeds``
    (Embedding(1, C)), ``bg_slots`` (Embedding(S, C)).

    One extra, **non-persistent** buffer ``seg_query_feat`` (num_queries, C) holds the
    segmenter's learned query features (official ``sem_seg_head.predictor.query_feat.weight``,
    passed to the official tracker as ``frames_info["seg_query_feat"]``); the slot branch
    starts from its rows picked by ``slot_index``. It is not part of ``state_dict()`` (so the
    ``tracker.*`` keys load strictly); set it with :meth:`set_seg_query_feat`.

    Args:
        hidden_dim: C (official 256). feedforward_dim: FFN width (2048). num_head: heads (8).
        decoder_layer_num: layers (``MODEL.TRACKER.DECODER_LAYERS``). mask_dim: channels of the
            mask features (256). num_classes: K (logits have K+1 columns, last = no object).
        num_new_ins: N (``MODEL.VIDEO_HEAD.NUM_NEW_INS``). num_slots: S (``NUM_SLOTS``).
        num_queries: Q, rows of ``seg_query_feat`` (``MODEL.MASK_FORMER.NUM_OBJECT_QUERIES``).
    Raises:
        ValueError: for non-positive sizes or ``hidden_dim`` not divisible by ``num_head``.
    """

    def __init__(self, *, hidden_dim: int = 256, feedforward_dim: int = 2048, num_head: int = 8,
                 decoder_layer_num: int = 6, mask_dim: int = 256, num_classes: int = 25,
                 num_new_ins: int = 100, num_slots: int = 5, num_queries: int = 100):
        super().__init__()
        for name, v in (("hidden_dim", hidden_dim), ("feedforward_dim", feedforward_dim),
                        ("num_head", num_head), ("decoder_layer_num", decoder_layer_num),
                        ("mask_dim", mask_dim), ("num_classes", num_classes),
                        ("num_new_ins", num_new_ins), ("num_slots", num_slots),
                        ("num_queries", num_queries)):
            if int(v) < 1:
                raise ValueError(f"VideoInstanceCutter: {name} must be >= 1, got {v}")
        if hidden_dim % num_head:
            raise ValueError(f"VideoInstanceCutter: hidden_dim {hidden_dim} is not divisible by "
                             f"num_head {num_head}")
        self.hidden_dim = hidden_dim
        self.mask_dim = mask_dim
        self.num_heads = num_head
        self.num_layers = decoder_layer_num
        self.num_classes = num_classes
        self.num_new_ins = num_new_ins
        self.num_slots = num_slots
        self.num_queries = num_queries

        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        self.slot_cross_attention_layers = nn.ModuleList()
        self.slot_ffn_layers = nn.ModuleList()
        for _ in range(decoder_layer_num):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(d_model=hidden_dim, nhead=num_head, dropout=0.0))
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(d_model=hidden_dim, nhead=num_head, dropout=0.0))
            self.transformer_ffn_layers.append(
                FFNLayer(d_model=hidden_dim, dim_feedforward=feedforward_dim, dropout=0.0))
            self.slot_cross_attention_layers.append(
                SlotCrossAttentionLayer(d_model=hidden_dim, nhead=num_head, dropout=0.0))
            self.slot_ffn_layers.append(
                FFNLayer(d_model=hidden_dim, dim_feedforward=feedforward_dim, dropout=0.0))

        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.pos_embed = MLP(mask_dim, hidden_dim, hidden_dim, 3)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.mask_feature_proj = nn.Conv2d(mask_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        self.new_ins_embeds = nn.Embedding(1, hidden_dim)
        self.bg_slots = nn.Embedding(num_slots, hidden_dim)

        self.register_buffer("seg_query_feat", torch.zeros(num_queries, hidden_dim),
                             persistent=False)
        self._seg_query_feat_set = False

    # ------------------------------------------------------------------ set-up
    def set_seg_query_feat(self, weight: Tensor) -> None:
        """Copy the segmenter's query features (official ``sem_seg_head.predictor.query_feat.weight``).

        Args:
            weight: (num_queries, hidden_dim) float tensor.
        Raises:
            ValueError: on a shape mismatch.
        """
        if tuple(weight.shape) != tuple(self.seg_query_feat.shape):
            raise ValueError(f"VideoInstanceCutter.set_seg_query_feat: expected shape "
                             f"{tuple(self.seg_query_feat.shape)} (num_queries, hidden_dim), got "
                             f"{tuple(weight.shape)}; pass sem_seg_head.predictor.query_feat.weight")
        with torch.no_grad():
            self.seg_query_feat.copy_(weight.detach().to(self.seg_query_feat))
        self._seg_query_feat_set = True

    # ------------------------------------------------------------------ helpers
    def _check(self, name: str, t: Tensor, shape: Tuple) -> None:
        """Eager-only shape check; ``None`` entries are free. Raises ValueError."""
        ok = t.dim() == len(shape) and all(s is None or int(d) == s for d, s in zip(t.shape, shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"VideoInstanceCutter: {name} must have shape {want}, got "
                             f"{tuple(t.shape)}")

    def _head(self, x: Tensor, mask_features: Tensor) -> Tuple[Tensor, Tensor]:
        """Official ``prediction`` + ``get_mask_pos_embed`` for one layer's output.

        x: (n, C) raw layer output; mask_features: (C, h, w) original mask features.
        Returns (pred_logits (n, K+1), track_pos (n, C)).
        """
        normed = self.decoder_norm(x)
        logits = self.class_embed(normed)
        mask_embed = self.mask_embed(normed)                                       # n, mask_dim
        proj = self.mask_feature_proj(mask_features.unsqueeze(0))[0]               # C, h, w
        masks = torch.matmul(mask_embed, proj.flatten(1))                          # n, hw
        return logits, self.pos_embed(pool_mask_features(masks, mask_features))

    # ------------------------------------------------------------------ stages
    def forward_first(self, frame_embeds: Tensor, mask_features: Tensor
                      ) -> Tuple[Tensor, Tensor, Tensor]:
        """First frame of a video (official ``inference`` branch ``i == 0 and resume is False``).

        Args:
            frame_embeds: (Q, C) float32, the segmenter's frame embeds (``pred_embds`` after
                ``decoder_norm``) of this frame.
            mask_features: (C, h, w) float32, this frame's (original) mask features.
        Returns:
            embeds (Q, C) raw last-layer output; pred_logits (Q, K+1) last layer;
            track_pos (Q, C) ``pos_embed`` of the mask-pooled original mask features.
        Raises:
            ValueError: (eager only) on wrong shapes.
        """
        if not _exporting():
            self._check("frame_embeds", frame_embeds, (None, self.hidden_dim))
            self._check("mask_features", mask_features, (self.mask_dim, None, None))
        fe = frame_embeds.unsqueeze(1)                                             # Q, 1, C
        out = fe
        for j in range(self.num_layers):
            out = self.transformer_cross_attention_layers[j](out, fe)
            out = self.transformer_self_attention_layers[j](out)
            out = self.transformer_ffn_layers[j](out)
        embeds = out[:, 0]
        pred_logits, track_pos = self._head(embeds, mask_features)
        return embeds, pred_logits, track_pos

    def forward_step(self, track_queries: Tensor, track_pos: Tensor, frame_embeds: Tensor,
                     mask_pooled: Tensor, mask_features: Tensor, slot_index: Tensor
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Any later frame (official ``inference`` ``else`` branch).

        Args:
            track_queries: (tQ, C) float32, each live track's last raw embed (official
                ``readout("last")``); tQ >= 0 and dynamic in ONNX.
            track_pos: (tQ, C) float32, each track's similarity-guided position embedding
                (official ``readout("last_pos")``).
            frame_embeds: (Q, C) float32, this frame's segmenter frame embeds.
            mask_pooled: (Q, C) float32, mean of the original mask features under the
                segmenter's masks (``sigmoid > 0.5``) for this frame.
            mask_features: (C, h, w) float32, this frame's original mask features.
            slot_index: (tQ + S,) int64 rows of ``seg_query_feat`` that start the slot branch:
                ``match_with_embeds(cat(track_queries, bg_slots), seg_query_feat)``.
        Returns:
            embeds (tQ+N, C) raw last-layer output (tracks first, then new-instance queries);
            pred_logits (tQ+N, K+1); slot_logits (tQ, K+1) from the slot branch's last layer
            (background-slot rows dropped); track_pos (tQ+N, C).
        Raises:
            ValueError: (eager only) on wrong shapes/dtypes, ``Q != N``, or when
                :meth:`set_seg_query_feat` was never called.
        """
        n_new, n_slots, c = self.num_new_ins, self.num_slots, self.hidden_dim
        if not _exporting():
            self._check("track_queries", track_queries, (None, c))
            tq = int(track_queries.shape[0])
            self._check("track_pos", track_pos, (tq, c))
            self._check("frame_embeds", frame_embeds, (n_new, c))
            self._check("mask_pooled", mask_pooled, (n_new, self.mask_dim))
            self._check("mask_features", mask_features, (self.mask_dim, None, None))
            self._check("slot_index", slot_index, (tq + n_slots,))
            if slot_index.dtype != torch.int64:
                raise ValueError(f"VideoInstanceCutter: slot_index must be int64, got {slot_index.dtype}")
            if not self._seg_query_feat_set:
                raise ValueError("VideoInstanceCutter: seg_query_feat is not set; call "
                                 "set_seg_query_feat(sem_seg_head.predictor.query_feat.weight) first")

        fe = frame_embeds.unsqueeze(1)                                             # Q, 1, C
        frame_pos = self.pos_embed(mask_pooled).unsqueeze(1)                       # Q, 1, C
        tq3 = track_queries.unsqueeze(1)                                           # tQ, 1, C
        tp3 = track_pos.unsqueeze(1)
        new_ins = self.new_ins_embeds.weight.expand(n_new, c).unsqueeze(1)          # N, 1, C
        x = torch.cat([tq3, new_ins], dim=0)
        x_pos = torch.cat([tp3, frame_pos], dim=0)
        for j in range(self.num_layers):
            x = self.transformer_cross_attention_layers[j](x, fe, query_pos=x_pos, pos=frame_pos)
            x = self.transformer_self_attention_layers[j](x)
            x = self.transformer_ffn_layers[j](x)

        bg = self.bg_slots.weight.unsqueeze(1)                                     # S, 1, C
        slots = self.seg_query_feat.index_select(0, slot_index).unsqueeze(1)       # tQ+S, 1, C
        slots_pos = torch.cat([tq3, bg], dim=0)
        slots_query = torch.cat([tp3, bg], dim=0)
        for j in range(self.num_layers):
            slots = self.slot_cross_attention_layers[j](slots, fe, query_pos=slots_pos,
                                                        slot_query=slots_query)
            slots = self.slot_ffn_layers[j](slots)

        embeds = x[:, 0]
        pred_logits, out_pos = self._head(embeds, mask_features)
        slot_logits = self.class_embed(self.decoder_norm(slots[:-n_slots, 0]))
        return embeds, pred_logits, slot_logits, out_pos

    # ------------------------------------------------------------------ online outputs
    def forward_masks(self, embeds: Tensor, mask_features: Tensor) -> Tensor:
        """The tracker's own per-frame mask logits of ``embeds`` (official ``prediction`` on the
        last layer: ``einsum(mask_embed(decoder_norm(x)), mask_feature_proj(mask_features))``,
        the ``pred_masks`` that ``VideoInstanceCutter.inference`` stores per track and frame).

        Args:
            embeds: (n, C) float32 raw last-layer outputs (the ``embeds`` of ``forward_first`` /
                ``forward_step``), n >= 0.
            mask_features: (D, h, w) float32 original (un-projected) mask features of the frame.
        Returns:
            (n, h, w) float32 mask logits (a pixel is foreground where the logit is > 0).
        """
        mask_embed = self.mask_embed(self.decoder_norm(embeds))                     # n, D
        proj = self.mask_feature_proj(mask_features.unsqueeze(0))[0]                # D, h, w
        return torch.einsum("nc,chw->nhw", mask_embed, proj)

    def forward_masks_folded(self, embeds: Tensor, mask_features: Tensor) -> Tensor:
        """:meth:`forward_masks` with the 1x1 ``mask_feature_proj`` folded into the embeds (the
        ``tracker_masks`` stage): ``(e W) . f + e . b`` instead of ``e . (W f + b)`` — the same
        value up to float32 summation order, at n*D*h*w instead of D*D*h*w multiply-adds (the
        projection of the whole feature map would cost more than the masks of 20 tracks).

        Shapes as :meth:`forward_masks`; ``n`` is dynamic in ONNX.
        """
        mask_embed = self.mask_embed(self.decoder_norm(embeds))                     # n, D
        conv = self.mask_feature_proj
        weight = conv.weight.flatten(1)                                             # D_out, D_in
        folded = torch.matmul(mask_embed, weight)                                   # n, D_in
        bias = torch.matmul(mask_embed, conv.bias)                                  # n
        d, h, w = mask_features.shape
        masks = torch.matmul(folded, mask_features.reshape(d, h * w))               # n, hw
        return (masks + bias.unsqueeze(1)).reshape(-1, h, w)
