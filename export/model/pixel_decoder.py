"""Mask2Former's MSDeformAttn pixel decoder (the ``sem_seg_head.pixel_decoder`` of DVIS-DAQ).

Semantics follow the official ``mask2former/modeling/pixel_decoder/msdeformattn.py``
(``MSDeformAttnTransformerEncoderOnly``, ``MSDeformAttnTransformerEncoderLayer``,
``MSDeformAttnTransformerEncoder``, ``MSDeformAttnPixelDecoder``) and
``mask2former/modeling/transformer_decoder/position_encoding.py`` (``PositionEmbeddingSine``).
Submodule names equal the official ones (``input_proj.{i}.{0,1}``, ``transformer.level_embed``,
``transformer.encoder.layers.{i}.{self_attn,norm1,linear1,linear2,norm2}``,
``mask_features``, ``adapter_{k}``, ``layer_{k}``), so the official state dict loads strictly.

Inference-path facts kept here (read off the official code):

- the encoder is always given an all-False padding mask, so every valid ratio is exactly 1.0
  and the reference points are the pixel centres ``((j + 0.5) / W_l, (i + 0.5) / H_l)``; the
  padding mask itself changes nothing (``masked_fill`` with all False);
- the position encoding is computed without a mask too, i.e. from the map size only
  (the shared :class:`~dvis_trt.export.model.position_encoding.PositionEmbeddingSine`);
- the encoder's sampling points per level are 4 (the official ``enc_n_points`` default; the
  ``DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS`` config key is not read);
- the FPN top-down path upsamples with **bilinear** ``align_corners=False`` (the official
  comment says nearest, the code says bilinear);
- only the first 3 levels of ``out`` (coarsest first) are returned as multi-scale features.

Export-friendliness: level sizes are read from tensor shapes (``Shape`` ops under the
TorchScript tracer) and the reference points come from ``arange`` over those sizes, so
``Hp``/``Wp`` stay dynamic in ONNX. Numerics equal the official formulas
(``linspace(0.5, H-0.5, H)`` and ``arange(H) + 0.5`` are the same exact float32 values).
"""
from __future__ import annotations

import copy
import math
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Conv2d, ShapeSpec, get_norm
from .msda import MSDeformAttn
from .position_encoding import PositionEmbeddingSine  # shared with the predictor
from .layers import activation_fn as _activation


# --------------------------------------------------------------------------------------------
# deformable transformer encoder
# --------------------------------------------------------------------------------------------


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + residual + ``norm1``, FFN
    (``linear1`` -> activation -> ``linear2``) + residual + ``norm2`` (official names).

    ``src``, ``pos`` (N,S,C); ``reference_points`` (1 or N,S,L,2); ``spatial_shapes`` int64
    (L,2); ``level_start_index`` int64 (L,). Returns (N,S,C).
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Optional[Tensor], reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        query = src if pos is None else src + pos
        src2 = self.self_attn(query, reference_points, src, spatial_shapes, level_start_index,
                              padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


def _size_as_float(v: Union[int, Tensor], device: Optional[torch.device]) -> Tensor:
    # (1,) float32 on ``device``: an int in eager mode, a traced 0-d size while tracing
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(v), dtype=torch.float32, device=device)


def encoder_reference_points(level_sizes: Sequence[Tuple[Union[int, Tensor], Union[int, Tensor]]],
                             device: Optional[torch.device] = None) -> Tensor:
    """Reference points of the encoder queries with all valid ratios 1 (official
    ``MSDeformAttnTransformerEncoder.get_reference_points`` on the inference path).

    ``level_sizes``: L pairs ``(H_l, W_l)`` (ints, or 0-d int tensors while tracing).
    Returns (1, S, L, 2) float32: for query pixel ``(i, j)`` of level ``l``, the normalised
    centre ``((j + 0.5) / W_l, (i + 0.5) / H_l)``, repeated for every level (valid ratio 1).
    The official ``linspace(0.5, H - 0.5, H) / (1.0 * H)`` gives the same float32 values.
    """
    refs = []
    for h, w in level_sizes:
        ref_y = torch.arange(h, dtype=torch.float32, device=device) + 0.5
        ref_x = torch.arange(w, dtype=torch.float32, device=device) + 0.5
        ref_y = ref_y / _size_as_float(h, device)  # (H,)
        ref_x = ref_x / _size_as_float(w, device)  # (W,)
        ref_y = ref_y.view(-1, 1).expand(h, w).reshape(-1)
        ref_x = ref_x.view(1, -1).expand(h, w).reshape(-1)
        refs.append(torch.stack((ref_x, ref_y), -1))  # (H*W, 2)
    ref = torch.cat(refs, 0)[None]  # (1, S, 2)
    return ref[:, :, None].expand(-1, -1, len(level_sizes), -1)


class MSDeformAttnTransformerEncoder(nn.Module):
    """Stack of ``num_layers`` deep copies of ``encoder_layer`` (official ``layers.{i}``)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                reference_points: Tensor, pos: Optional[Tensor] = None,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """``src``, ``pos`` (N,S,C); ``reference_points`` (1,S,L,2) from
        :func:`encoder_reference_points`. Returns (N,S,C)."""
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index,
                        padding_mask)
        return out


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable-DETR encoder over L levels (official ``MSDeformAttnTransformerEncoderOnly``).

    Children: ``encoder`` and the parameter ``level_embed`` (L, d_model).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 num_feature_levels: int = 4, enc_n_points: int = 4):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        layer = MSDeformAttnTransformerEncoderLayer(d_model, dim_feedforward, dropout,
                                                    activation, num_feature_levels, nhead,
                                                    enc_n_points)
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]
                ) -> Tuple[Tensor, Tensor, Tensor]:
        """``srcs``, ``pos_embeds``: L maps (N,C,H_l,W_l), coarsest first.

        Returns ``memory`` (N,S,C), ``spatial_shapes`` int64 (L,2) ``[H_l, W_l]`` and
        ``level_start_index`` int64 (L,), computed from the maps' shapes (graph values in ONNX).
        """
        if len(srcs) != self.num_feature_levels or len(pos_embeds) != len(srcs):
            raise ValueError(f"MSDeformAttnTransformerEncoderOnly: expected "
                             f"{self.num_feature_levels} levels, got {len(srcs)} maps and "
                             f"{len(pos_embeds)} position embeddings")
        src_flat, pos_flat, sizes, shape_rows = [], [], [], []
        for lvl, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            sizes.append((src.shape[2], src.shape[3]))
            shape_rows.append(torch._shape_as_tensor(src)[2:])
            src_flat.append(src.flatten(2).transpose(1, 2))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flat = torch.cat(src_flat, 1)
        pos_flat = torch.cat(pos_flat, 1)
        spatial_shapes = torch.stack(shape_rows).to(src_flat.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)),
                                       spatial_shapes.prod(1).cumsum(0)[:-1]))
        reference_points = encoder_reference_points(sizes, device=src_flat.device)
        memory = self.encoder(src_flat, spatial_shapes, level_start_index, reference_points,
                              pos_flat, None)
        return memory, spatial_shapes, level_start_index


# --------------------------------------------------------------------------------------------
# pixel decoder
# --------------------------------------------------------------------------------------------
def _as_shape_spec(v) -> ShapeSpec:
    if isinstance(v, ShapeSpec):
        return v
    if hasattr(v, "channels") and hasattr(v, "stride"):
        return ShapeSpec(int(v.channels), int(v.stride))
    channels, stride = v
    return ShapeSpec(int(channels), int(stride))


class MSDeformAttnPixelDecoder(nn.Module):
    """Official ``MSDeformAttnPixelDecoder`` (Mask2Former), constructor with explicit kwargs.

    ``input_shape``: backbone features ``{name: (channels, stride)}`` (tuples or
    :class:`~dvis_trt.export.model.backbone.ShapeSpec`), e.g. res2..res5 of the R50;
    ``conv_dim`` / ``mask_dim`` (``SEM_SEG_HEAD.CONVS_DIM`` / ``MASK_DIM``); ``norm`` of the
    FPN convs (``SEM_SEG_HEAD.NORM``, "GN"); ``transformer_dropout`` (``MASK_FORMER.DROPOUT``);
    ``transformer_nheads`` (``MASK_FORMER.NHEADS``); ``transformer_dim_feedforward`` (the
    official builder hard-codes 1024); ``transformer_enc_layers``
    (``SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS``); ``transformer_in_features``
    (``DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES``); ``common_stride`` (4);
    ``enc_n_points`` 4 (official default, not configurable there).

    Raises ValueError when a transformer feature is missing from ``input_shape`` or
    ``conv_dim`` is not a multiple of 32 (GroupNorm(32)).
    """

    def __init__(self, input_shape: Mapping[str, Union[ShapeSpec, Tuple[int, int]]], *,
                 conv_dim: int = 256, mask_dim: int = 256, norm: Optional[str] = "GN",
                 transformer_dropout: float = 0.0, transformer_nheads: int = 8,
                 transformer_dim_feedforward: int = 1024, transformer_enc_layers: int = 6,
                 transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
                 common_stride: int = 4, enc_n_points: int = 4):
        super().__init__()
        shapes = {k: _as_shape_spec(v) for k, v in input_shape.items()}
        missing = [f for f in transformer_in_features if f not in shapes]
        if missing:
            raise ValueError(f"MSDeformAttnPixelDecoder: transformer_in_features {missing} are "
                             f"not in input_shape ({sorted(shapes)})")
        if conv_dim % 32:
            raise ValueError(f"MSDeformAttnPixelDecoder: conv_dim {conv_dim} must be a multiple "
                             "of 32 (GroupNorm(32))")
        ordered = sorted(shapes.items(), key=lambda kv: kv[1].stride)  # fine -> coarse
        self.in_features = [k for k, _ in ordered]
        self.feature_strides = [v.stride for _, v in ordered]
        self.feature_channels = [v.channels for _, v in ordered]
        t_ordered = [(k, v) for k, v in ordered if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in t_ordered]
        t_channels = [v.channels for _, v in t_ordered]
        self.transformer_feature_strides = [v.stride for _, v in t_ordered]
        self.transformer_num_feature_levels = len(self.transformer_in_features)

        # one 1x1 conv + GroupNorm per transformer level, coarsest first
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in (t_channels[::-1] if self.transformer_num_feature_levels > 1
                      else t_channels[-1:]))
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, nhead=transformer_nheads, num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward, dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels, enc_n_points=enc_n_points)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        _c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # always 3 scales for the transformer decoder
        self.common_stride = common_stride
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = int(math.log2(stride) - math.log2(common_stride))

        use_bias = norm == ""
        lateral, output = [], []
        for idx, in_channels in enumerate(self.feature_channels[:self.num_fpn_levels]):
            lateral_conv = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias,
                                  norm=get_norm(norm, conv_dim))
            output_conv = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1,
                                 bias=use_bias, norm=get_norm(norm, conv_dim), activation=F.relu)
            _c2_xavier_fill(lateral_conv)
            _c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral.append(lateral_conv)
            output.append(output_conv)
        # top-down order (coarse -> fine); plain lists: the modules are registered above
        self.lateral_convs = lateral[::-1]
        self.output_convs = output[::-1]

    def forward_features(self, features: Mapping[str, Tensor]
                         ) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """Official ``forward_features``.

        ``features``: ``{name: (N, C_name, H/stride, W/stride)}`` float for every name of
        ``input_shape``. Returns ``mask_features`` (N, mask_dim, H/4, W/4), the encoder output
        of the coarsest level (N, conv_dim, H/32, W/32), and ``multi_scale_features``: 3 maps
        (N, conv_dim, h_l, w_l), coarsest first (strides 32, 16, 8 for the R50 config).

        Raises ValueError when a feature is missing.
        """
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise ValueError(f"MSDeformAttnPixelDecoder: features {missing} missing (got "
                             f"{sorted(features)})")
        srcs, pos = [], []
        for idx, f in enumerate(self.transformer_in_features[::-1]):
            x = features[f].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        memory, _, _ = self.transformer(srcs, pos)
        n = memory.shape[0]

        # split the flattened memory back into per-level maps (sizes from the srcs' shapes)
        out: List[Tensor] = []
        start = 0
        for src in srcs:
            h, w = src.shape[2], src.shape[3]
            z = memory[:, start:start + h * w]
            out.append(z.transpose(1, 2).reshape(n, -1, h, w))
            start = start + h * w

        for idx, f in enumerate(self.in_features[:self.num_fpn_levels][::-1]):
            x = features[f].float()
            cur = self.lateral_convs[idx](x)
            y = cur + F.interpolate(out[-1], size=cur.shape[-2:], mode="bilinear",
                                    align_corners=False)
            out.append(self.output_convs[idx](y))

        multi_scale_features = out[:self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features

    def forward(self, features: Mapping[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """``features`` as :meth:`forward_features`; returns ``(mask_features,
        multi_scale_features)`` (the two outputs the transformer decoder consumes)."""
        mask_features, _, multi_scale_features = self.forward_features(features)
        return mask_features, multi_scale_features


def _c2_xavier_fill(module: nn.Conv2d) -> None:
    # fvcore ``c2_xavier_fill``: kaiming_uniform(a=1) weights, zero bias (init only)
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
