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


def activation_fn(name: str):
    """``F.relu`` / ``F.gelu`` / ``F.glu`` by name (official ``_get_activation_fn``); ValueError otherwise."""
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "glu":
        return F.glu
    raise ValueError(f"activation should be relu/gelu/glu, not {name!r}")


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def multi_head_attention(attn: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                         attn_mask: Optional[Tensor] = None,
                         key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """``nn.MultiheadAttention`` forward (dropout 0, no weights) written with plain ops.

    Used when exporting to ONNX: with torch 2.13's TorchScript exporter, the built-in module
    bakes the key length into a ``Reshape`` when key and value are the same tensor (self-attention
    or cross-attention without position embeddings), so a graph exported at one track count fails
    at another. Here no shape is read in Python, so every length stays dynamic. The module is only
    the holder of the parameters (``in_proj_weight``/``in_proj_bias``/``out_proj``), so state-dict
    names do not change. Eager runs keep using the module itself (official numerics).

    Args:
        query: (Lq, B, E); key, value: (Lk, B, E).
        attn_mask: (B*nhead, Lq, Lk) bool (True = blocked) or additive float, or None.
        key_padding_mask: (B, Lk) bool (True = ignored key), or None.
    Returns:
        (Lq, B, E).
    """
    e, h = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(query, w[:e], b[:e]).unflatten(-1, (h, -1)).permute(1, 2, 0, 3)
    k = F.linear(key, w[e:2 * e], b[e:2 * e]).unflatten(-1, (h, -1)).permute(1, 2, 3, 0)
    v = F.linear(value, w[2 * e:], b[2 * e:]).unflatten(-1, (h, -1)).permute(1, 2, 0, 3)
    logits = torch.matmul(q * float((e // h) ** -0.5), k)               # (B, h, Lq, Lk)
    if attn_mask is not None:
        m = attn_mask.unflatten(0, (-1, h))
        logits = logits.masked_fill(m, float("-inf")) if m.dtype == torch.bool else logits + m
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = torch.matmul(logits.softmax(dim=-1), v)                         # (B, h, Lq, d)
    return attn.out_proj(out.permute(2, 0, 1, 3).flatten(2))


def _attend(attn: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
            attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Tensor:
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return multi_head_attention(attn, query, key, value, attn_mask, key_padding_mask)
    return attn(query, key, value=value, attn_mask=attn_mask,
                key_padding_mask=key_padding_mask, need_weights=False)[0]


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
        self.activation = activation_fn(activation)
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
            out = _attend(self.self_attn, qk, qk, t, tgt_mask, tgt_key_padding_mask)
            return tgt + self.dropout(out)
        qk = _with_pos(tgt, query_pos)
        out = _attend(self.self_attn, qk, qk, tgt, tgt_mask, tgt_key_padding_mask)
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
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            t = self.norm(tgt)
            out = _attend(self.multihead_attn, _with_pos(t, query_pos), _with_pos(memory, pos),
                          memory, memory_mask, memory_key_padding_mask)
            return tgt + self.dropout(out)
        out = _attend(self.multihead_attn, _with_pos(tgt, query_pos), _with_pos(memory, pos),
                      memory, memory_mask, memory_key_padding_mask)
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
        self.activation = activation_fn(activation)
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
