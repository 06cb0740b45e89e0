"""Transformer building blocks shared by the predictor, the tracker and the refiner.

Semantics follow the official ``mask2former_video/modeling/transformer_decoder/
video_mask2former_transformer_decoder.py`` (``SelfAttentionLayer``, ``CrossAttentionLayer``,
``FFNLayer``, ``MLP``) as used by DVIS-DAQ: post-norm by default, dropout 0 at inference,
sequence-first tensors ``(L, B, C)`` as ``nn.MultiheadAttention`` expects. Parameter names
(``self_attn``, ``multihead_attn``, ``norm``, ``linear1``, ``linear2``, ``layers.N``) are the
official ones so that official checkpoints load strictly.

Masked attention: the official code passes a boolean ``attn_mask`` of shape
``(B*nhead, Lq, Lk)`` (True = not allowed). :func:`masked_attention_bias` turns it into an
additive float bias (``0`` / ``-inf``) so the exported graph carries no boolean tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "glu":
        return F.glu
    raise ValueError(f"activation should be relu/gelu/glu, not {name!r}")


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class SelfAttentionLayer(nn.Module):
    """Self-attention + residual + LayerNorm (official ``SelfAttentionLayer``).

    ``tgt`` (L, B, C) float32; ``query_pos`` (L, B, C) or None is added to queries and keys
    only. Returns (L, B, C).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: Tensor, tgt_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            t = self.norm(tgt)
            qk = _with_pos(t, query_pos)
            out = self.self_attn(qk, qk, value=t, attn_mask=tgt_mask,
                                 key_padding_mask=tgt_key_padding_mask, need_weights=False)[0]
            return tgt + self.dropout(out)
        qk = _with_pos(tgt, query_pos)
        out = self.self_attn(qk, qk, value=tgt, attn_mask=tgt_mask,
                             key_padding_mask=tgt_key_padding_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class CrossAttentionLayer(nn.Module):
    """Cross-attention + residual + LayerNorm (official ``CrossAttentionLayer``).

    ``tgt`` (Lq, B, C) attends to ``memory`` (Lk, B, C); ``pos`` is added to the keys,
    ``query_pos`` to the queries; values are ``memory`` without position. ``memory_mask`` is
    either a boolean (B*nhead, Lq, Lk) mask (True = blocked) or an additive float mask of
    that shape. Returns (Lq, B, C).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            t = self.norm(tgt)
            out = self.multihead_attn(query=_with_pos(t, query_pos), key=_with_pos(memory, pos),
                                      value=memory, attn_mask=memory_mask,
                                      key_padding_mask=memory_key_padding_mask,
                                      need_weights=False)[0]
            return tgt + self.dropout(out)
        out = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos),
                                  value=memory, attn_mask=memory_mask,
                                  key_padding_mask=memory_key_padding_mask,
                                  need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    """Two-layer feed-forward + residual + LayerNorm (official ``FFNLayer``). (L, B, C) → same."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: Tensor) -> Tensor:
        if self.normalize_before:
            t = self.norm(tgt)
            return tgt + self.dropout(self.linear2(self.dropout(self.activation(self.linear1(t)))))
        out = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(out))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (official ``MLP``); (..., in) → (..., out)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        last = self.num_layers - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def masked_attention_bias(mask_logits: Tensor, nhead: int) -> Tensor:
    """Additive attention mask of Mask2Former's masked attention, export-friendly.

    Follows ``forward_prediction_heads`` of the official decoder: a key is blocked where
    ``sigmoid(mask) < 0.5`` (i.e. ``mask_logits < 0``); a query whose keys are *all* blocked
    is left unmasked (``attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False``).
    Written with ``Where`` instead of index assignment so ONNX gets no NonZero/ScatterND.

    Args:
        mask_logits: (B, Q, K) float, the predicted mask logits resized to the memory level
            and flattened over pixels (K = h*w of that level, frames concatenated if any).
        nhead: number of attention heads; the mask is repeated per head like the official
            ``unsqueeze(1).repeat(1, nhead, 1, 1).flatten(0, 1)``.
    Returns:
        (B*nhead, Q, K) float32 with 0 where attention is allowed and ``-inf`` where blocked.
    """
    blocked = mask_logits.sigmoid() < 0.5
    all_blocked = blocked.all(dim=-1, keepdim=True)
    blocked = blocked & ~all_blocked
    zero = torch.zeros((), dtype=mask_logits.dtype, device=mask_logits.device)
    ninf = torch.full((), float("-inf"), dtype=mask_logits.dtype, device=mask_logits.device)
    bias = torch.where(blocked, ninf, zero)
    b, q, k = bias.shape
    return bias.unsqueeze(1).expand(b, nhead, q, k).reshape(b * nhead, q, k)
