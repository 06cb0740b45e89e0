"""The DINOv2 ViT inside the ViT-Adapter: ``PatchEmbed``, ``LayerScale``, ``Attention``, ``Mlp``,
``Block``, ``DinoVisionTransformer`` and its position-embedding resize.

Semantics follow the official ``DVIS_DAQ/mask2former/modeling/backbones_vitAdapter/``
``backbones.py`` (``DinoVisionTransformer``, ``interpolate_pos_encoding``,
``prepare_tokens_with_masks``) and ``layers/`` (``Block``, ``Attention`` -- the path
``MemEffAttention`` takes without xFormers --, ``LayerScale``, ``Mlp``, ``PatchEmbed``); module
names equal the official ones (``backbone.vit_module.blocks.23.ls2.gamma``, ...). Eager runs use
:func:`official_pos_embed` (the official bicubic ``F.interpolate``, bit for bit); exported graphs
use :func:`resize_pos_embed` (the same numbers for every grid size from Range/Floor/Gather/Mul/Add
only). Why, and the architecture numbers: :mod:`dvis_trt.export.model.vit_adapter`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # the numbers live with the adapter (they hold the adapter's too)
    from .vit_adapter import VitAdapterSpec

__all__ = ["PatchEmbed", "LayerScale", "Attention", "Mlp", "Block", "DinoVisionTransformer",
           "inverse_scale_table", "cubic_taps", "resize_pos_embed", "official_pos_embed"]


#: Longest token-grid side the exported position-embedding resize accepts (16368 px).
MAX_GRID = 1024
_CUBIC_A = -0.75


# --------------------------------------------------------------------------------------------
# DINOv2 ViT
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """``proj``: Conv2d(3, C, 16, stride 16). (N,3,H,W) -> tokens (N, H/16*W/16, C) and the
    grid map (N, C, H/16, W/16) (official ``PatchEmbed`` with ``return_HW``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class LayerScale(nn.Module):
    """``x * gamma`` (official ``LayerScale``; parameter ``gamma`` (C,))."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Global multi-head self-attention (official ``Attention.forward``: ``q`` is scaled by
    ``head_dim ** -0.5`` before ``q @ k^T``; softmax; ``@ v``; ``proj``). (N,L,C) -> (N,L,C).
    No size is read in Python, so the token count stays dynamic in an exported graph."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape  # graph values while tracing: a Reshape target of known length
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]         # (N, M, L, D)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc1`` -> exact GELU -> ``fc2`` (official ``Mlp``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block with LayerScale (official ``Block`` at inference):
    ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``. (N,L,C) -> (N,L,C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def inverse_scale_table(grid: int) -> Tensor:
    """(MAX_GRID + 1,) float32: entry g = PyTorch's bicubic source step for a grid of g."""
    # PyTorch's bicubic kernel uses float(1.0 / scale_factor) (computed in double) as the
    # source step; scale_factor = (g + 0.1) / sqrt(N) in double (official code). Entry g.
    g = np.arange(MAX_GRID + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        inv = 1.0 / ((g + 0.1) / math.sqrt(grid * grid))
    return torch.from_numpy(inv.astype(np.float32))


def cubic_taps(out_size: Union[int, Tensor], in_size: int, inv_scale: Tensor
               ) -> Tuple[List[Tensor], List[Tensor]]:
    """Source indices and weights of PyTorch's bicubic resize along one axis.

    Follows ATen ``HelperInterpCubic::compute_indices_weights`` (``UpSample.h``:
    ``area_pixel_compute_source_index`` with ``cubic=True``, ``guard_index_and_lambda``,
    ``get_cubic_upsample_coefficients`` with A = -0.75), all in float32.

    Args:
        out_size: output length (int, or a 0-d int64 tensor while tracing).
        in_size: input length (static).
        inv_scale: 0-d float32 tensor, the source step (``1 / scale_factor``).
    Returns:
        (indices, weights): 4 int64 tensors (out_size,) clamped to ``[0, in_size-1]`` and 4
        float32 tensors (out_size,), taps ordered as PyTorch sums them.
    """
    i = torch.arange(out_size, dtype=torch.float32)
    real = inv_scale * (i + 0.5) - 0.5
    idx = torch.clamp(torch.floor(real), max=float(in_size - 1))
    t = torch.clamp(real - idx, 0.0, 1.0)
    a = _CUBIC_A

    def conv1(x: Tensor) -> Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def conv2(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    x2 = 1.0 - t
    weights = [conv2(t + 1.0), conv1(t), conv1(x2), conv2(x2 + 1.0)]
    base = idx.to(torch.int64)
    indices = [torch.clamp(base + (k - 1), 0, in_size - 1) for k in range(4)]
    return indices, weights


def resize_pos_embed(pos_embed: Tensor, gh: Union[int, Tensor], gw: Union[int, Tensor],
                     grid: int, table: Optional[Tensor] = None) -> Tensor:
    """The official ``interpolate_pos_encoding`` for a ``gh x gw`` token grid.

    Args:
        pos_embed: (1, 1 + grid*grid, C) float32 (cls position first).
        gh, gw: token rows / columns (ints, or 0-d int64 tensors while tracing).
        grid: side of the stored grid (37).
        table: the inverse-scale table (:func:`inverse_scale_table` of ``grid``; made here if
            None, which a trace records as a constant anyway).
    Returns:
        (1, 1 + gh*gw, C), rows-major, the cls position unchanged.
    """
    if table is None:
        table = inverse_scale_table(grid)
    c = pos_embed.shape[-1]
    cls_pos, patch = pos_embed[:, :1], pos_embed[0, 1:].reshape(grid, grid, c)
    inv_h, inv_w = table[gh], table[gw]
    # width taps first (PyTorch's inner loop), then height taps, each summed in tap order
    idx, wts = cubic_taps(gw, grid, inv_w)
    cols = None
    for k in range(4):
        term = patch.index_select(1, idx[k]) * wts[k].view(1, -1, 1)   # (grid, gw, C)
        cols = term if cols is None else cols + term
    idx, wts = cubic_taps(gh, grid, inv_h)
    out = None
    for k in range(4):
        term = cols.index_select(0, idx[k]) * wts[k].view(-1, 1, 1)    # (gh, gw, C)
        out = term if out is None else out + term
    return torch.cat((cls_pos, out.reshape(1, -1, c)), dim=1)


def official_pos_embed(pos_embed: Tensor, height: int, width: int, patch: int, grid: int
                       ) -> Tensor:
    """Eager position embedding exactly as the official ``interpolate_pos_encoding``:
    ``F.interpolate(..., scale_factor=((H//16 + 0.1)/37, (W//16 + 0.1)/37), mode="bicubic")``,
    or ``pos_embed`` itself for a 37x37 grid on a square input. ``height``/``width``: padded
    input size in pixels. Returns (1, 1 + gh*gw, C). Exported graphs use
    :func:`resize_pos_embed` instead (same numbers within float32 rounding: PyTorch's kernel
    contracts multiply-adds into FMAs; ``tests/test_vit_adapter.py`` measures the gap).
    """
    n = pos_embed.shape[1] - 1
    gh, gw = height // patch, width // patch
    if gh * gw == n and height == width:
        return pos_embed
    c = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].reshape(1, grid, grid, c).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((gh + 0.1) / math.sqrt(n),
                                                       (gw + 0.1) / math.sqrt(n)),
                              mode="bicubic")
    if patch_pos.shape[-2:] != (gh, gw):  # the official code asserts the same
        raise ValueError(f"position embedding resized to {tuple(patch_pos.shape[-2:])}, "
                         f"expected {(gh, gw)}")
    return torch.cat((pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, c)), dim=1)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT (official ``DinoVisionTransformer``, ``block_chunks=0``), as the adapter uses
    it: ``prepare_tokens`` (patch embed, cls token, resized position embedding) and the
    ``blocks``. Parameters in official order: ``cls_token`` (1,1,C), ``pos_embed``
    (1,1+grid^2,C), ``mask_token`` (1,C) (unused at inference), ``patch_embed.proj``,
    ``blocks.{i}``, ``norm`` (unused by the adapter)."""

    def __init__(self, spec: VitAdapterSpec):
        super().__init__()
        c = spec.embed_dim
        self.embed_dim = c
        self.patch_size = spec.patch_size
        self.pos_grid = spec.pos_grid
        self.patch_embed = PatchEmbed(spec.patch_size, 3, c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.pos_grid ** 2 + 1, c))
        self.blocks = nn.ModuleList(Block(c, spec.num_heads, spec.mlp_ratio, spec.init_values)
                                    for _ in range(spec.depth))
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, c))
        # not in the checkpoint: the bicubic source steps the exported resize looks up
        self.register_buffer("pos_scale_table", inverse_scale_table(spec.pos_grid),
                             persistent=False)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def prepare_tokens(self, x: Tensor) -> Tuple[Tensor, Union[int, Tensor], Union[int, Tensor]]:
        """(N,3,Hp,Wp) -> tokens (N, 1 + gh*gw, C) (cls first, position added), gh, gw
        (official ``prepare_tokens_with_masks(x, masks=None, return_HW=True)``)."""
        feat = self.patch_embed(x)                       # (N, C, gh, gw)
        gh, gw = feat.shape[2], feat.shape[3]
        tokens = feat.flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        if torch.jit.is_tracing():
            pos = resize_pos_embed(self.pos_embed, gh, gw, self.pos_grid,
                                   self.pos_scale_table)
        else:
            pos = official_pos_embed(self.pos_embed, x.shape[2], x.shape[3], self.patch_size,
                                     self.pos_grid)
        return tokens + pos, gh, gw
