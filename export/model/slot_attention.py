"""Slot attention used by the referring tracker's slot (foreground/disappearance) branch.

Port of the official ``dvis_daq/slot_attention.py`` (``SlotAttention``,
``SlotCrossAttentionLayer``). Parameter names are the official ones
(``multihead_attn``, ``norm``, ``slot_attn.norm_inputs``, ``slot_attn.project_q.{0,1}``,
``slot_attn.project_k``) so that ``tracker.slot_cross_attention_layers.*`` of an official
checkpoint loads strictly. Inference only: dropout is kept as a module (p = 0 in DVIS-DAQ)
but never matters in ``eval()``.

Export notes: the two einsums of the official code are written as batched matmuls; nothing
depends on tensor values, and the number of slots (= tracks + background slots) stays a
dynamic dimension. While tracing / exporting, the cross-attention runs through
``layers.multi_head_attention`` (plain ops, same parameters) because the built-in
``nn.MultiheadAttention`` bakes sequence lengths into the TorchScript-exported graph; eager
runs use the module itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import multi_head_attention
from .layers import activation_fn as _activation




class SlotAttention(nn.Module):
    """One round of slot attention: slots compete for inputs (official ``SlotAttention``).

    Only one iteration is ever run and there is no GRU / MLP update (the official module
    keeps ``num_iterations``, ``num_slots`` and ``mlp_hidden_size`` as unused attributes; so
    do we, to keep the constructor signature).

    Computation (B batch, N inputs, M slots, D = ``slot_size``):
      ``k = project_k(norm_inputs(inputs_k))`` (B,N,D); ``q = project_q(slots)`` (B,M,D)
      (LayerNorm then bias-free Linear); ``logits = D**-0.5 * k q^T`` (B,N,M);
      ``attn = softmax over the slots (dim -1)``; ``attn += eps``; ``attn /= sum over the
      inputs (dim 1)``; ``updates = attn^T @ inputs`` (B,M,C) - a weighted mean of the
      *un-projected* inputs per slot.

    Args:
        in_features: C, channels of ``inputs`` / ``inputs_k``.
        num_iterations, num_slots, mlp_hidden_size: stored only (unused, as officially).
        slot_size: D, channels of ``slots`` and of the attention space.
        eps: added to the attention before the per-slot normalisation (official 1e-6).
    """

    def __init__(self, in_features: int, num_iterations: int, num_slots: int, slot_size: int,
                 mlp_hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.in_features = in_features
        self.num_iterations = num_iterations
        self.num_slots = num_slots
        self.slot_size = slot_size
        self.mlp_hidden_size = mlp_hidden_size
        self.eps = eps
        self.attn_scale = slot_size ** -0.5
        self.norm_inputs = nn.LayerNorm(in_features)
        self.project_q = nn.Sequential(
            nn.LayerNorm(slot_size),
            nn.Linear(slot_size, slot_size, bias=False),
        )
        self.project_k = nn.Linear(in_features, slot_size, bias=False)

    def forward(self, inputs: Tensor, inputs_k: Tensor, slots: Tensor) -> Tensor:
        """Update the slots from the inputs.

        Args:
            inputs: (B, N, C) float, values that are averaged.
            inputs_k: (B, N, C) float, used for the keys.
            slots: (B, M, D) float, slot queries.
        Returns:
            (M, B, C) float - note: **sequence-first**, the official module returns
            ``updates.transpose(0, 1)``.
        Raises:
            ValueError: if ``slots`` is not 3-D (the official code asserts this).
        """
        if slots.dim() != 3:
            raise ValueError(f"SlotAttention: slots must be (B, M, D), got shape {tuple(slots.shape)}")
        k = self.project_k(self.norm_inputs(inputs_k))           # B, N, D
        q = self.project_q(slots)                                # B, M, D
        logits = torch.matmul(k, q.transpose(1, 2)) * self.attn_scale   # B, N, M
        attn = logits.softmax(dim=-1) + self.eps
        attn = attn / attn.sum(dim=1, keepdim=True)
        updates = torch.matmul(attn.transpose(1, 2), inputs)     # B, M, C
        return updates.transpose(0, 1)


class SlotCrossAttentionLayer(nn.Module):
    """Cross-attention followed by slot attention (official ``SlotCrossAttentionLayer``).

    Post-norm path (the one DVIS-DAQ uses, ``normalize_before=False``), sequence-first
    tensors, ``M`` slots, ``Lk`` memory tokens, batch ``B``:
      ``t2 = MHA(query=tgt + query_pos, key=memory + pos, value=memory)`` (M,B,C);
      ``t3 = slot_attn(inputs=t2, inputs_k=tgt + t2, slots=slot_query)`` (batch-first inside);
      ``out = norm(tgt + t3)``.

    Args:
        d_model: C. nhead: attention heads. dropout: kept for signature (0 in DVIS-DAQ).
        activation: stored only (unused by the official forward). normalize_before: pre-norm
            path, ported as written officially (it feeds sequence-first tensors to the
            batch-first slot attention; unused by DVIS-DAQ).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        self.slot_attn = SlotAttention(in_features=d_model, num_iterations=1, num_slots=0,
                                       slot_size=d_model, mlp_hidden_size=d_model, eps=1e-6)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @staticmethod
    def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
        return x if pos is None else x + pos

    def _mha(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
             key_padding_mask: Optional[Tensor]) -> Tensor:
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return multi_head_attention(self.multihead_attn, query, key, value, attn_mask,
                                        key_padding_mask)
        return self.multihead_attn(query=query, key=key, value=value, attn_mask=attn_mask,
                                   key_padding_mask=key_padding_mask, need_weights=False)[0]

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None,
                slot_query: Optional[Tensor] = None) -> Tensor:
        """Args: ``tgt`` (M,B,C) slot features, ``memory`` (Lk,B,C), ``pos`` (Lk,B,C) or None
        added to the keys, ``query_pos`` (M,B,C) or None added to the queries,
        ``slot_query`` (M,B,C) or None (then ``tgt``) - the slot-attention queries;
        ``memory_mask`` / ``memory_key_padding_mask`` as ``nn.MultiheadAttention``.
        Returns (M,B,C) float."""
        if slot_query is None:
            slot_query = tgt
        if self.normalize_before:
            t = self.norm(tgt)
            t2 = self._mha(self._with_pos(t, query_pos), self._with_pos(memory, pos), memory,
                           memory_mask, memory_key_padding_mask)
            # official pre-norm path: no transposes around the (batch-first) slot attention
            t3 = self.slot_attn(t2, tgt + self.dropout(t2), slot_query)
            return tgt + self.dropout(t3)
        t2 = self._mha(self._with_pos(tgt, query_pos), self._with_pos(memory, pos), memory,
                       memory_mask, memory_key_padding_mask)
        inputs_k = tgt + self.dropout(t2)
        t3 = self.slot_attn(t2.transpose(0, 1), inputs_k.transpose(0, 1),
                            slot_query.transpose(0, 1))
        return self.norm(tgt + self.dropout(t3))
