"""2-D sine position embedding shared by the pixel decoder and the predictor.

Semantics follow the official ``mask2former/modeling/transformer_decoder/position_encoding.py``
(``PositionEmbeddingSine``, itself from DETR): cumulative sums of the valid-pixel mask along
each axis, optionally normalised to ``(0, scale]`` with ``eps = 1e-6``, divided by
``temperature ** (2 * (i // 2) / num_pos_feats)``, sine on even and cosine on odd channels
(interleaved), y-channels first, then x-channels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine position embedding of a feature map (official ``PositionEmbeddingSine``).

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels
            (the official modules use ``hidden_dim // 2``).
        temperature: base of the frequency ladder (official default 10000).
        normalize: divide the cumulative coordinates by the last one (+1e-6) and multiply
            by ``scale``.
        scale: defaults to ``2 * pi``; giving it without ``normalize`` raises ValueError,
            as in the official code.

    Has no parameters or buffers (nothing in the state dict).
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000,
                 normalize: bool = False, scale: Optional[float] = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` was given but normalize=False; "
                             "pass normalize=True or drop `scale`")
        self.num_pos_feats = int(num_pos_feats)
        self.temperature = temperature
        self.normalize = bool(normalize)
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Position embedding for ``x``.

        Args:
            x: (N, C, H, W), any float dtype; only its N, H, W (and device) are used.
            mask: optional bool (N, H, W), True = padded pixel (excluded from the cumulative
                coordinates). ``None`` (what every DVIS-DAQ caller passes) = all valid.
        Returns:
            (N, 2*num_pos_feats, H, W) float32, channels ``[pos_y | pos_x]``.
        Raises:
            ValueError: if ``x`` is not 4-D or ``mask`` has the wrong shape.

        H and W are read from the tensor, not baked in, so the ONNX (TorchScript) export
        keeps them dynamic: the valid-pixel map is ``ones_like(x[:, 0])``.
        """
        if x.dim() != 4:
            raise ValueError(f"PositionEmbeddingSine: expected x of shape (N, C, H, W), "
                             f"got {tuple(x.shape)}")
        if mask is None:
            # The official code builds an all-False bool mask and cumsums its negation; the
            # cumulative sums of a float ones map are the same exact integers 1..H / 1..W.
            valid = torch.ones_like(x[:, 0], dtype=torch.float32)
        else:
            if mask.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1:] != x.shape[2:]:
                raise ValueError(f"PositionEmbeddingSine: mask must be (N, H, W) = "
                                 f"{(x.shape[0],) + tuple(x.shape[2:])}, got {tuple(mask.shape)}")
            valid = (~mask.bool()).to(torch.float32)
        y_embed = valid.cumsum(1)
        x_embed = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor")
                                     / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()),
                            dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()),
                            dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale}")
