"""ViT-Adapter on DINOv2 (``D2VitAdapterDinoV2``), the backbone of DVIS-DAQ's ViT-L models.

Semantics follow the official ``DVIS_DAQ/mask2former/modeling/backbones_vitAdapter/``:
``adapter.py`` (``DinoV2ViTAdapter``, ``D2VitAdapterDinoV2``, ``SpatialPriorModule``,
``InteractionBlockWithCls_Efficient``, ``Extractor``, ``ConvFFN``, ``DWConv``,
``deform_inputs``, ``get_adapter_args``), ``backbones.py`` (``DinoVisionTransformer``,
``interpolate_pos_encoding``, ``prepare_tokens_with_masks``, ``get_models``) and ``layers/``
(``Block``, ``Attention`` -- the path ``MemEffAttention`` takes without xFormers --,
``LayerScale``, ``Mlp``, ``PatchEmbed``). Module names equal the official ones, so an official
ViT-L checkpoint loads strictly (``backbone.level_embed``, ``backbone.spm.stem.1.running_mean``,
``backbone.interactions.3.extra_extractors.1.attn.value_proj.weight``,
``backbone.vit_module.blocks.23.ls2.gamma``, ...).

Inference-path facts (read off the official code):

- the ViT is DINOv2 with 16x16 patches (the official loader resizes the /14 patch kernel; the
  DVIS-DAQ checkpoints already hold 16x16 kernels), ``img_size`` 592 -> a 37x37 position grid
  (``pos_embed`` (1, 1 + 37*37, C)), LayerScale (``init_values`` 1e-5), qkv/proj/FFN biases, exact
  GELU, LayerNorm eps 1e-6 everywhere in the ViT and the extractors; ``mask_token`` and the
  final ``norm`` are in the checkpoint but unused by the adapter;
- the adapter in these checkpoints is extractor-only (``InteractionBlockWithCls_Efficient``):
  the ViT blocks run unchanged (cls token included) and four extractors (the last one with two
  extra extractors) pull ViT tokens into the spatial-prior queries with a 1-level, 16-head,
  4-point MSDeformAttn; ``deform_ratio`` (0.5) is accepted but ignored by the official
  ``MSDeformAttn`` (value projection stays C x C), and so here;
- queries live at strides 8, 16, 32 of the padded input, values at stride 16 (the ViT grid);
  the ConvFFN's depth-wise conv runs per level (``DWConv`` splits the tokens 16:4:1), so padded
  H and W must be multiples of 32;
- SyncBatchNorm = BatchNorm2d at inference (running statistics, eps 1e-5).

Position embedding (``DinoVisionTransformer.interpolate_pos_encoding``): the 37x37 grid is
resized bicubically (A = -0.75, ``align_corners=False``, border clamped) to the token grid
``(gh, gw) = (Hp/16, Wp/16)`` with ``scale_factor = ((gh + 0.1)/37, (gw + 0.1)/37)`` -- the
+0.1 is part of the result: PyTorch maps output pixel ``i`` to source ``(i + 0.5)/s - 0.5``
with the *given* scale ``s``, not ``gh/37``. Only when the grid is exactly 37x37 on a square
input (592x592, never a multiple of 32) is the table used as is. Eager runs call that very
``F.interpolate`` (:func:`.dinov2.official_pos_embed`: the official numbers, bit for bit). Exported
graphs use :func:`.dinov2.resize_pos_embed`, which computes the same thing for every grid size with
Range/Floor/Gather/Mul/Add only: per output row and column the four source indices and cubic
weights are derived from the grid size inside the graph (the inverse scales come from a
constant table computed in double precision exactly as PyTorch does), then applied separably in
PyTorch's order (width taps, then height taps). One graph is thus right for every accepted input
size on ONNX Runtime and TensorRT alike, within float32 rounding (PyTorch's kernel contracts
multiply-adds into FMAs: ~3e-6 of the table's magnitude, ``tests/test_vit_adapter.py``). Why not
the alternatives: a constant per size needs one graph per size (the segmenter's H, W are dynamic
axes); a ``Resize`` with output ``sizes`` maps coordinates with ``gh/37`` (wrong by ~1e-2), and a
cubic ``Resize`` with ``scales`` depends on each runtime applying the given (non-integral) scale
to the coordinate mapping and on its cubic coefficient and border rule -- not something both
ONNX Runtime and TensorRT guarantee.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import ShapeSpec
from .dinov2 import DinoVisionTransformer
from .msda import MSDeformAttn
from .pixel_decoder import encoder_reference_points

__all__ = ["VitAdapterSpec", "VITL_SPEC", "SpatialPriorModule", "Extractor", "InteractionBlock",
           "D2VitAdapterDinoV2", "vit_adapter_spec", "build_vit_adapter"]


# --------------------------------------------------------------------------------------------
# architecture numbers
# --------------------------------------------------------------------------------------------
class VitAdapterSpec:
    """Numbers of one ViT-Adapter (official ``get_models`` + ``get_adapter_args``).

    ``embed_dim``/``depth``/``num_heads``/``mlp_ratio``: the ViT; ``patch_size`` 16;
    ``pos_grid``: side of the pretrained position grid (``img_size // patch_size``, 37);
    ``conv_inplane``: spatial-prior width (64); ``deform_num_heads``/``n_points``: extractor
    MSDeformAttn; ``cffn_ratio``: ConvFFN hidden ratio; ``interaction_indexes``: inclusive
    ``[first, last]`` ViT block of each interaction; ``init_values``: LayerScale init;
    ``use_extra_extractor``: two extra extractors after the last interaction.
    """

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 mlp_ratio: float = 4.0, patch_size: int = 16, pos_grid: int = 37,
                 conv_inplane: int = 64, deform_num_heads: int = 16, n_points: int = 4,
                 cffn_ratio: float = 0.25,
                 interaction_indexes: Sequence[Sequence[int]] = ((0, 5), (6, 11), (12, 17),
                                                                 (18, 23)),
                 init_values: float = 1e-5, use_extra_extractor: bool = True):
        self.embed_dim = int(embed_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.patch_size = int(patch_size)
        self.pos_grid = int(pos_grid)
        self.conv_inplane = int(conv_inplane)
        self.deform_num_heads = int(deform_num_heads)
        self.n_points = int(n_points)
        self.cffn_ratio = float(cffn_ratio)
        self.interaction_indexes = [(int(a), int(b)) for a, b in interaction_indexes]
        self.init_values = float(init_values)
        self.use_extra_extractor = bool(use_extra_extractor)
        if self.embed_dim % self.num_heads or self.embed_dim % self.deform_num_heads:
            raise ValueError(f"ViT-Adapter: embed_dim {self.embed_dim} must be divisible by "
                             f"num_heads {self.num_heads} and deform_num_heads "
                             f"{self.deform_num_heads}")
        covered = [i for a, b in self.interaction_indexes for i in range(a, b + 1)]
        if covered != list(range(self.depth)):
            raise ValueError(f"ViT-Adapter: interaction_indexes {self.interaction_indexes} must "
                             f"cover blocks 0..{self.depth - 1} in order, each once")

    def __repr__(self) -> str:
        return (f"VitAdapterSpec(embed_dim={self.embed_dim}, depth={self.depth}, "
                f"num_heads={self.num_heads}, interactions={self.interaction_indexes})")


#: The official ``vitl`` numbers (``get_models('vitl')`` + ``get_adapter_args('vitl')``).
VITL_SPEC = VitAdapterSpec()


# --------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int, stride: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Convolutional stem of the adapter (official ``SpatialPriorModule``; SyncBatchNorm as
    BatchNorm2d). (N,3,Hp,Wp) -> c1 (N,C,Hp/4,Wp/4) map, c2/c3/c4 tokens (N, h*w, C) at strides
    8/16/32 (before the level embedding)."""

    def __init__(self, inplanes: int, embed_dim: int):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1),
                                  nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, kernel_size=1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, kernel_size=1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return (self.fc1(c1), self.fc2(c2).flatten(2).transpose(1, 2),
                self.fc3(c3).flatten(2).transpose(1, 2), self.fc4(c4).flatten(2).transpose(1, 2))


class DWConv(nn.Module):
    """Depth-wise 3x3 conv applied per level to the 3-level query tokens (official ``DWConv``).

    ``x`` (N, 4hw + hw + hw/4, C) with (h, w) the ViT grid -> same shape. The official code
    splits at ``n = len // 21`` (16n, 4n, n tokens); with h, w even that is the same split.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, h, w) -> Tensor:
        n2, n3 = 4 * h * w, h * w
        parts = []
        for tokens, (ph, pw) in ((x[:, :n2], (2 * h, 2 * w)), (x[:, n2:n2 + n3], (h, w)),
                                 (x[:, n2 + n3:], (h // 2, w // 2))):
            fmap = _to_map(tokens, ph, pw)
            parts.append(self.dwconv(fmap).flatten(2).transpose(1, 2))
        return torch.cat(parts, dim=1)


class ConvFFN(nn.Module):
    """``fc1`` -> per-level depth-wise conv -> GELU -> ``fc2`` (official ``ConvFFN``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h, w) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Extractor(nn.Module):
    """Deformable cross-attention from the adapter queries into the ViT tokens, then ConvFFN
    (official ``Extractor`` with ``with_cffn=True``, ``n_levels=1``; drop-path is identity at
    inference).

    ``query`` (N, Lq, C) 3-level adapter tokens; ``reference_points`` (1, Lq, 1, 2);
    ``feat`` (N, h*w, C) ViT tokens; ``spatial_shapes`` int64 (1, 2) = [[h, w]];
    ``level_start_index`` int64 (1,) = [0]. Returns (N, Lq, C).
    """

    def __init__(self, dim: int, num_heads: int, n_points: int, cffn_ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(d_model=dim, n_levels=1, n_heads=num_heads, n_points=n_points)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, query: Tensor, reference_points: Tensor, feat: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, h, w) -> Tensor:
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat),
                                  spatial_shapes, level_start_index, None)
        return query + self.ffn(self.ffn_norm(query), h, w)


class InteractionBlock(nn.Module):
    """Official ``InteractionBlockWithCls_Efficient`` at inference: the ViT blocks of this
    interaction on ``cat(cls, x)``, then ``extractor`` (and ``extra_extractors``, last block
    only) update the adapter queries ``c``. Owns no ViT block (they live in ``vit_module``)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, cffn_ratio: float,
                 extra_extractor: bool):
        super().__init__()
        self.extractor = Extractor(dim, num_heads, n_points, cffn_ratio)
        self.extra_extractors = nn.Sequential(*[Extractor(dim, num_heads, n_points, cffn_ratio)
                                                for _ in range(2)]) if extra_extractor else None

    def forward(self, x: Tensor, c: Tensor, cls: Tensor, blocks: Sequence[nn.Module],
                deform: Tuple[Tensor, Tensor, Tensor], h, w) -> Tuple[Tensor, Tensor, Tensor]:
        x = torch.cat((cls, x), dim=1)
        for blk in blocks:
            x = blk(x)
        cls, x = x[:, :1], x[:, 1:]
        ref, shapes, start = deform
        c = self.extractor(c, ref, x, shapes, start, h, w)
        if self.extra_extractors is not None:
            for ex in self.extra_extractors:
                c = ex(c, ref, x, shapes, start, h, w)
        return x, c, cls


class D2VitAdapterDinoV2(nn.Module):
    """The ViT-Adapter backbone (official ``D2VitAdapterDinoV2`` / ``DinoV2ViTAdapter`` at
    inference). State-dict order: ``level_embed`` (3,C), ``spm``, ``interactions``, ``up``,
    ``norm1``..``norm4``, ``vit_module``.

    Forward: images (N,3,Hp,Wp) float32 (normalised, zero-padded; Hp, Wp multiples of 32) ->
    ``{"res2": (N,C,Hp/4,Wp/4), "res3": /8, "res4": /16, "res5": /32}``.

    Raises ValueError (eager) for an input that is not (N,3,H,W) with H, W multiples of 32.
    """

    def __init__(self, spec: VitAdapterSpec = VITL_SPEC):
        super().__init__()
        self.spec = spec
        c = spec.embed_dim
        self.interaction_indexes = list(spec.interaction_indexes)
        self.level_embed = nn.Parameter(torch.zeros(3, c))
        self.spm = SpatialPriorModule(spec.conv_inplane, c)
        n = len(self.interaction_indexes)
        self.interactions = nn.Sequential(*[
            InteractionBlock(c, spec.deform_num_heads, spec.n_points, spec.cffn_ratio,
                             extra_extractor=spec.use_extra_extractor and i == n - 1)
            for i in range(n)])
        self.up = nn.ConvTranspose2d(c, c, 2, 2)
        self.norm1 = nn.BatchNorm2d(c)
        self.norm2 = nn.BatchNorm2d(c)
        self.norm3 = nn.BatchNorm2d(c)
        self.norm4 = nn.BatchNorm2d(c)
        nn.init.normal_(self.level_embed)
        self.vit_module = DinoVisionTransformer(spec)
        self._out_features = ["res2", "res3", "res4", "res5"]
        self._strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """``{res2..res5: ShapeSpec(embed_dim, 4/8/16/32)}``."""
        return {k: ShapeSpec(self.spec.embed_dim, s) for k, s in self._strides.items()}

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if not torch.jit.is_tracing():
            if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % 32 or x.shape[3] % 32:
                raise ValueError("D2VitAdapterDinoV2: images must be (N, 3, H, W) with H and W "
                                 f"multiples of 32, got {tuple(x.shape)}")
        c1, c2, c3, c4 = self.spm(x)
        c2 = c2 + self.level_embed[0]
        c3 = c3 + self.level_embed[1]
        c4 = c4 + self.level_embed[2]
        c = torch.cat([c2, c3, c4], dim=1)

        tokens, h, w = self.vit_module.prepare_tokens(x)
        cls, xt = tokens[:, :1], tokens[:, 1:]
        # deform_inputs2 of the official code: queries at strides 8/16/32 (1 reference level),
        # values = the ViT grid (h, w) = stride 16
        ref = encoder_reference_points([(2 * h, 2 * w), (h, w), (h // 2, w // 2)],
                                       device=x.device)[:, :, :1]
        shapes = _grid_shape(x, self.vit_module.patch_size)
        start = torch.zeros(1, dtype=torch.int64, device=x.device)
        deform = (ref, shapes, start)
        outs = []
        blocks = self.vit_module.blocks
        for layer, (a, b) in zip(self.interactions, self.interaction_indexes):
            xt, c, cls = layer(xt, c, cls, blocks[a:b + 1], deform, h, w)
            outs.append(_to_map(xt, h, w))

        n2, n3 = 4 * h * w, h * w
        c2 = _to_map(c[:, :n2], 2 * h, 2 * w)
        c3 = _to_map(c[:, n2:n2 + n3], h, w)
        c4 = _to_map(c[:, n2 + n3:], h // 2, w // 2)
        c1 = self.up(c2) + c1
        x1, x2, x3, x4 = outs
        c1 = c1 + F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
        c2 = c2 + F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
        c3 = c3 + x3
        c4 = c4 + F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return {"res2": self.norm1(c1), "res3": self.norm2(c2), "res4": self.norm3(c3),
                "res5": self.norm4(c4)}


def _to_map(tokens: Tensor, h, w) -> Tensor:
    """(N, h*w, C) tokens -> (N, C, h, w) map. ``reshape`` with a 4-entry target (not
    ``unflatten``, whose exported target has an unknown length and stops ONNX shape inference,
    after which the exporter stamps the traced sizes onto later tensors)."""
    n, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(n, c, h, w)


def _grid_shape(x: Tensor, patch: int) -> Tensor:
    """int64 (1, 2) ``[[Hp // patch, Wp // patch]]`` from the image shape (a graph value while
    tracing)."""
    return (torch._shape_as_tensor(x)[2:] // patch).to(device=x.device).view(1, 2)


#: Non-official config keys (``DVIS_TRT.VIT_ADAPTER.*``) that shrink the ViT-Adapter for tests
#: and the demo (``export/configs/tiny_vit.yaml``); official configs never set them.
SPEC_OVERRIDE_KEYS = {"EMBED_DIM": "embed_dim", "DEPTH": "depth", "NUM_HEADS": "num_heads",
                      "MLP_RATIO": "mlp_ratio", "POS_GRID": "pos_grid",
                      "CONV_INPLANE": "conv_inplane", "DEFORM_NUM_HEADS": "deform_num_heads",
                      "N_POINTS": "n_points", "INTERACTION_INDEXES": "interaction_indexes"}


def vit_adapter_spec(cfg) -> VitAdapterSpec:
    """The :class:`VitAdapterSpec` of a resolved config (official ``D2VitAdapterDinoV2.__init__``
    -> ``get_adapter_args(cfg.MODEL.VIT_ADAPTER.NAME)``).

    ``MODEL.VIT_ADAPTER.NAME`` must be ``vitl`` (the only ViT-Adapter any DVIS-DAQ config or
    checkpoint uses); ``VIT_WEIGHT``, ``FREEZE_VIT``, ``FINETUNE*`` and ``WITH_CP`` only matter
    for training. ``DVIS_TRT.VIT_ADAPTER.*`` (see :data:`SPEC_OVERRIDE_KEYS`) shrinks the
    model for tests. Raises InputError (one line) for another name or a bad override.
    """
    from dvis_trt.errors import InputError

    where = f" (config {cfg.source})" if getattr(cfg, "source", None) else ""
    name = cfg.get("MODEL.VIT_ADAPTER.NAME", "vitl")
    if name != "vitl":
        raise InputError(f"MODEL.VIT_ADAPTER.NAME is {name!r}{where}; dvis-trt supports the "
                         "ViT-Adapter 'vitl' (DINOv2 ViT-L/16) that the DVIS-DAQ ViT configs use")
    overrides = cfg.get("DVIS_TRT.VIT_ADAPTER", None) or {}
    kwargs = {}
    for key, value in dict(overrides).items():
        if key not in SPEC_OVERRIDE_KEYS:
            raise InputError(f"unknown key DVIS_TRT.VIT_ADAPTER.{key}{where}; known: "
                             f"{', '.join(SPEC_OVERRIDE_KEYS)}")
        kwargs[SPEC_OVERRIDE_KEYS[key]] = value
    try:
        return VitAdapterSpec(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"DVIS_TRT.VIT_ADAPTER{where}: {exc}") from exc


def build_vit_adapter(cfg) -> D2VitAdapterDinoV2:
    """``D2VitAdapterDinoV2`` (random init) for a resolved config; see :func:`vit_adapter_spec`."""
    return D2VitAdapterDinoV2(vit_adapter_spec(cfg))
