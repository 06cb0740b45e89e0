"""The offline temporal refiner of DVIS-DAQ (whole-clip stage after the tracker).

Follows the official ``dvis_daq/refiner.py`` class ``TemporalRefiner`` as called by
``DVIS_DAQ_offline.run_window_inference`` (``dvis_daq/meta_architecture.py``) at inference
time (``self.training == False``), batch size 1.

Every decoder layer refines the instance embeds of all ``L`` frames of the clip in four steps:

1. time self-attention: each instance attends over the ``L`` frames (sequence = frames);
2. optionally (``use_local_attn``, ViT-Adapter-L configs) a short temporal convolution
   ``Conv1d(k=5) -> ReLU -> Conv1d(k=3)`` over frames with "same" replicate padding, plus a
   residual connection and a LayerNorm (``conv_short_aggregate_layers`` / ``conv_norms``);
3. object self-attention: the ``Qr`` instances of one frame attend to each other;
4. cross-attention from the instances of a frame to the ``Q`` frame embeds (segmenter
   queries) of the same frame, then the FFN.

After the last layer (the official inference only keeps it: ``outputs[:, -1:]``) the embeds
go through ``decoder_norm``; the class logits are ``class_embed`` of the activation-weighted
temporal average (``pred_class``: softmax over frames of ``activation_proj``), identical for
every frame; the mask embeds are the ``mask_embed`` MLP of the normed embeds, and the masks
their dot product with the mask features (``windows_prediction``, which only chunks time).

Layout: the official code works in ``(b, c, t, q)``; with ``b = 1`` its ``(t, b*q, c)`` and
``(q, b*t, c)`` sequence-first views are exactly our ``(L, Qr, C)`` and ``(Qr, L, C)``, so this
port keeps time-major ``(L, Qr, C)`` tensors and only transposes between the attention steps.

Padding mask: the official ``forward`` takes a padding mask ``(b, q, t)`` (True = frame
padded for that instance) but never uses it at inference: the key-padding masks of both
self-attentions are commented out, cross-attention gets ``memory_key_padding_mask=None``, and
``pred_class`` / ``windows_prediction`` accept ``padding_masks`` without reading it. Padded
frames therefore take part in every attention and in the temporal pooling of the class
logits; the host fills them with the track's similarity-guided position embedding passed
through ``padding_embed``, which is ``nn.Identity()`` in the official code. So the stage has
no padding-mask input.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer

__all__ = ["TemporalRefiner"]


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


class TemporalRefiner(nn.Module):
    """DVIS-DAQ offline temporal refiner (official ``dvis_daq/refiner.py::TemporalRefiner``).

    Keyword arguments are the official constructor's (``DVIS_DAQ_offline.from_config``
    fills them from ``MODEL.MASK_FORMER.HIDDEN_DIM``, ``DIM_FEEDFORWARD``, ``NHEADS``,
    ``MODEL.REFINER.DECODER_LAYERS``, ``MODEL.MASK_FORMER.HIDDEN_DIM`` (as ``mask_dim``),
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``, ``MODEL.MASK_FORMER.TEST.WINDOW_SIZE`` and
    ``MODEL.VIDEO_HEAD.USE_LOCAL_ATTN``).

    Args:
        hidden_channel: embedding width ``C``.
        feedforward_channel: FFN hidden width.
        num_head: attention heads (must divide ``hidden_channel``).
        decoder_layer_num: number of refiner layers.
        mask_dim: width of the mask embeds = channels of the mask features.
        class_num: number of foreground classes ``K`` (logits have ``K + 1`` entries, the
            last one "no object").
        windows: frames per chunk in :meth:`windows_prediction` (memory knob only; results do
            not depend on it).
        use_local_attn: add the short temporal convolutions after each time self-attention.

    Raises:
        ValueError: a size is not positive, or ``num_head`` does not divide
            ``hidden_channel``.

    Submodule names equal the official state-dict names under ``refiner.``, in the official
    registration order, so ``load_state_dict(strict=True)`` accepts official checkpoints.
    """

    def __init__(self, hidden_channel: int = 256, feedforward_channel: int = 2048,
                 num_head: int = 8, decoder_layer_num: int = 6, mask_dim: int = 256,
                 class_num: int = 25, windows: int = 5, use_local_attn: bool = False):
        super().__init__()
        for name, value in (("hidden_channel", hidden_channel),
                            ("feedforward_channel", feedforward_channel),
                            ("num_head", num_head), ("decoder_layer_num", decoder_layer_num),
                            ("mask_dim", mask_dim), ("class_num", class_num),
                            ("windows", windows)):
            if int(value) < 1:
                raise ValueError(f"TemporalRefiner: {name} must be >= 1, got {value}; "
                                 "check the MODEL.* values of the config")
        if hidden_channel % num_head != 0:
            raise ValueError(f"TemporalRefiner: num_head={num_head} does not divide "
                             f"hidden_channel={hidden_channel}; check MODEL.MASK_FORMER.NHEADS")

        self.hidden_channel = hidden_channel
        self.mask_dim = mask_dim
        self.num_classes = class_num
        self.windows = windows
        self.num_heads = num_head
        self.use_local_attn = bool(use_local_attn)
        self.num_layers = decoder_layer_num

        # Registration order = official state-dict order.
        self.transformer_obj_self_attention_layers = nn.ModuleList()
        self.transformer_time_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        self.conv_short_aggregate_layers = nn.ModuleList()
        self.conv_norms = nn.ModuleList()
        for _ in range(decoder_layer_num):
            self.transformer_time_self_attention_layers.append(
                SelfAttentionLayer(d_model=hidden_channel, nhead=num_head, dropout=0.0,
                                   normalize_before=False))
            if self.use_local_attn:
                self.conv_short_aggregate_layers.append(nn.Sequential(
                    nn.Conv1d(hidden_channel, hidden_channel, kernel_size=5, stride=1,
                              padding="same", padding_mode="replicate"),
                    nn.ReLU(),
                    nn.Conv1d(hidden_channel, hidden_channel, kernel_size=3, stride=1,
                              padding="same", padding_mode="replicate"),
                ))
                self.conv_norms.append(nn.LayerNorm(hidden_channel))
            self.transformer_obj_self_attention_layers.append(
                SelfAttentionLayer(d_model=hidden_channel, nhead=num_head, dropout=0.0,
                                   normalize_before=False))
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(d_model=hidden_channel, nhead=num_head, dropout=0.0,
                                    normalize_before=False))
            self.transformer_ffn_layers.append(
                FFNLayer(d_model=hidden_channel, dim_feedforward=feedforward_channel,
                         dropout=0.0, normalize_before=False))

        self.decoder_norm = nn.LayerNorm(hidden_channel)
        self.class_embed = nn.Linear(hidden_channel, class_num + 1)
        self.mask_embed = MLP(hidden_channel, hidden_channel, mask_dim, 3)
        self.activation_proj = nn.Linear(hidden_channel, 1)
        # Official: ``self.padding_embed = nn.Identity()`` (learned variants are commented
        # out). The host pads a track's missing frames with padding_embed(pos_embed).
        self.padding_embed = nn.Identity()

    # ------------------------------------------------------------------ checks
    def _check_stage_inputs(self, instance_embeds: Tensor, frame_embeds: Tensor) -> None:
        c = self.hidden_channel
        if instance_embeds.dim() != 3 or instance_embeds.shape[-1] != c:
            raise ValueError(f"TemporalRefiner.forward_stage: instance_embeds must be (L, Qr, {c}), "
                             f"got {tuple(instance_embeds.shape)}; stack the track queries time-major")
        if frame_embeds.dim() != 3 or frame_embeds.shape[-1] != c:
            raise ValueError(f"TemporalRefiner.forward_stage: frame_embeds must be (L, Q, {c}), "
                             f"got {tuple(frame_embeds.shape)}")
        if frame_embeds.shape[0] != instance_embeds.shape[0]:
            raise ValueError("TemporalRefiner.forward_stage: instance_embeds and frame_embeds "
                             f"cover different numbers of frames ({instance_embeds.shape[0]} vs "
                             f"{frame_embeds.shape[0]}); pad every track to the whole clip")

    def _check_mask_inputs(self, mask_embed: Tensor, mask_features: Tensor, where: str) -> None:
        d = self.mask_dim
        if mask_embed.dim() != 3 or mask_embed.shape[-1] != d:
            raise ValueError(f"TemporalRefiner.{where}: mask_embed must be (t, Qs, {d}), "
                             f"got {tuple(mask_embed.shape)}")
        if mask_features.dim() != 4 or mask_features.shape[1] != d:
            raise ValueError(f"TemporalRefiner.{where}: mask_features must be (t, {d}, h, w), "
                             f"got {tuple(mask_features.shape)}")
        if mask_features.shape[0] != mask_embed.shape[0]:
            raise ValueError(f"TemporalRefiner.{where}: mask_embed has {mask_embed.shape[0]} frames "
                             f"but mask_features has {mask_features.shape[0]}; pass the same frames")

    # ------------------------------------------------------------------ stages
    def forward_stage(self, instance_embeds: Tensor, frame_embeds: Tensor) -> Tuple[Tensor, Tensor]:
        """The ``refiner`` stage: refine whole-clip instance embeds, predict classes and mask embeds.

        Official semantics: ``TemporalRefiner.forward`` (last layer only, as the inference
        path keeps ``outputs[:, -1:]``), ``windows_prediction``'s ``decoder_norm`` and
        ``mask_embed``, and ``pred_class``; the caller's ``out["pred_logits"][:, 0]`` picks
        frame 0 of logits that are the same for every frame, which is what we return.
        The official padding mask has no effect at inference (see the module docstring), so
        there is no padding-mask input: padded frames are ordinary inputs.

        Args:
            instance_embeds: (L, Qr, C) float, per-frame instance queries of the clip, time
                major (official ``instance_embeds`` (1, C, L, Qr) permuted); padded frames hold
                ``padding_embed(track pos embed)``.
            frame_embeds: (L, Q, C) float, the segmenter's per-frame query embeds after its
                ``decoder_norm`` (official ``frame_embeds`` (1, C, L, Q) permuted).
        Returns:
            pred_logits: (Qr, K+1) float class logits (activation-weighted temporal pooling).
            mask_embed: (L, Qr, mask_dim) float, per-frame mask embeds for :meth:`mask_head`.
        Raises:
            ValueError: wrong rank or channel count, or different frame counts (eager only;
                not checked while tracing for export).
        """
        if not _tracing():
            self._check_stage_inputs(instance_embeds, frame_embeds)
        x = instance_embeds                       # (L, Qr, C): sequence = frames
        memory = frame_embeds.transpose(0, 1)     # (Q, L, C): per frame, keys = its Q queries
        for i in range(self.num_layers):
            x = self.transformer_time_self_attention_layers[i](x)
            x = x.transpose(0, 1)                 # (Qr, L, C): sequence = instances
            if self.use_local_attn:
                y = x.transpose(1, 2)             # (Qr, C, L): Conv1d over frames
                y = self.conv_short_aggregate_layers[i](y) + y
                x = self.conv_norms[i](y.transpose(1, 2))
            x = self.transformer_obj_self_attention_layers[i](x)
            x = self.transformer_cross_attention_layers[i](x, memory)
            x = self.transformer_ffn_layers[i](x)
            x = x.transpose(0, 1)                 # back to (L, Qr, C)
        decoder_output = self.decoder_norm(x)
        return self.pred_class(decoder_output), self.mask_embed(decoder_output)

    forward = forward_stage

    def pred_class(self, decoder_output: Tensor) -> Tensor:
        """Activation-weighted temporal pooling of class logits (official ``pred_class``).

        Args:
            decoder_output: (L, Qr, C) float, the ``decoder_norm``-ed embeds.
        Returns:
            (Qr, K+1) float: ``class_embed(sum_t softmax_t(activation_proj(x))_t * x_t)``.
            The official code repeats this over the ``L`` frames; all copies are equal.
        """
        weights = self.activation_proj(decoder_output).softmax(dim=0)  # (L, Qr, 1)
        pooled = (decoder_output * weights).sum(dim=0)                  # (Qr, C)
        return self.class_embed(pooled)

    def mask_head(self, mask_embed: Tensor, mask_features: Tensor) -> Tensor:
        """The ``mask_head`` stage: mask logits from mask embeds and mask features.

        Official ``windows_prediction`` einsum ``"lbtqc,btchw->lbqthw"`` for one layer and
        batch, written as a batched matmul over frames. The official code runs it in chunks
        of ``windows`` frames to save memory; chunks only split time (see
        :meth:`windows_prediction`), so the host may call this on any frame range.

        Args:
            mask_embed: (t, Qs, mask_dim) float, rows of :meth:`forward_stage`'s mask_embed
                (any subset of queries ``Qs``, any frame range ``t``).
            mask_features: (t, mask_dim, h, w) float, the segmenter's mask features of the same
                frames.
        Returns:
            (Qs, t, h, w) float mask logits (threshold 0 = sigmoid 0.5).
        Raises:
            ValueError: wrong ranks, channels or frame counts (eager only).
        """
        if not _tracing():
            self._check_mask_inputs(mask_embed, mask_features, "mask_head")
        masks = torch.matmul(mask_embed, mask_features.flatten(2))      # (t, Qs, h*w)
        masks = masks.unflatten(2, mask_features.shape[-2:])             # (t, Qs, h, w)
        return masks.transpose(0, 1)

    # ------------------------------------------------------------------ eager helpers
    def windows_prediction(self, mask_embed: Tensor, mask_features: Tensor,
                           windows: Optional[int] = None) -> Tensor:
        """Mask logits for the whole clip in time chunks (official ``windows_prediction``).

        Eager helper (Python loop over chunks; not an exported stage).

        Args:
            mask_embed: (L, Qs, mask_dim) float.
            mask_features: (L, mask_dim, h, w) float; may live on another device, each chunk is
                moved to ``mask_embed``'s device like the official code does.
            windows: frames per chunk; default ``self.windows`` (``TEST.WINDOW_SIZE``).
        Returns:
            (Qs, L, h, w) float32 mask logits, equal to ``mask_head`` on all frames at once.
        Raises:
            ValueError: ``windows < 1`` or mismatched inputs.
        """
        windows = self.windows if windows is None else int(windows)
        if windows < 1:
            raise ValueError(f"TemporalRefiner.windows_prediction: windows must be >= 1, got {windows}")
        self._check_mask_inputs(mask_embed, mask_features, "windows_prediction")
        chunks = []
        for start in range(0, mask_embed.shape[0], windows):
            feats = mask_features[start:start + windows].to(mask_embed.device)
            chunks.append(self.mask_head(mask_embed[start:start + windows], feats).float())
        return torch.cat(chunks, dim=1)

    def inference(self, instance_embeds: Tensor, frame_embeds: Tensor, mask_features: Tensor,
                  windows: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Monolithic eager refiner: ``forward_stage`` then :meth:`windows_prediction`.

        Args:
            instance_embeds: (L, Qr, C); frame_embeds: (L, Q, C); mask_features (L, mask_dim, h, w).
            windows: mask-prediction chunk in frames (default ``self.windows``).
        Returns:
            pred_logits (Qr, K+1) and pred_masks (Qr, L, h, w) float32 logits, as the official
            ``out["pred_logits"][:, 0][0]`` and ``out["pred_masks"][0]``.
        """
        pred_logits, mask_embed = self.forward_stage(instance_embeds, frame_embeds)
        return pred_logits, self.windows_prediction(mask_embed, mask_features, windows)
