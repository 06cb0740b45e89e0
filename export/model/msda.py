"""Multi-scale deformable attention (MSDeformAttn) for the pixel decoder's encoder.

Semantics follow the official Mask2Former ops as vendored by DVIS-DAQ:
``mask2former/modeling/pixel_decoder/ops/functions/ms_deform_attn_func.py``
(``ms_deform_attn_core_pytorch``, the CPU fallback the official model runs on CPU, and the
contract of the CUDA kernel it falls back from) and
``mask2former/modeling/pixel_decoder/ops/modules/ms_deform_attn.py`` (``MSDeformAttn``).

Sampling rule (reference, CUDA kernel and every mode below): per level ``l`` of size
``(H_l, W_l)``, a location ``(x, y)`` in ``[0, 1]`` (normalised, including the padding area)
is sampled bilinearly at pixel coordinates ``(x * W_l - 0.5, y * H_l - 0.5)``; neighbours
outside the map contribute zero (``grid_sample(..., padding_mode="zeros",
align_corners=False)`` on the grid ``2 * loc - 1``).

Tensor contract shared by every mode (DESIGN.md "MSDeformAttn"):

=====================  ============================  =========================================
name                   shape                         dtype / meaning
=====================  ============================  =========================================
value                  (N, S, M, D)                  float; S = sum_l H_l * W_l, M heads
spatial_shapes         (L, 2)                        int64, rows ``[H_l, W_l]``
level_start_index      (L,)                          int64, offset of level l inside S
sampling_locations     (N, Lq, M, L, P, 2)           float, ``(x, y)`` in [0, 1]
attention_weights      (N, Lq, M, L, P)              float (softmax over L*P done by caller)
output                 (N, Lq, M * D)                float, heads concatenated
=====================  ============================  =========================================

Modes, selected with :func:`msda_mode` (module-level, default ``"eager"``):

- ``"eager"``: the reference, with level sizes read to Python ints (what the official model
  computes on CPU). Tracing in this mode bakes the level sizes into the graph.
- ``"onnx"``: the same arithmetic (``GridSample``), but every level size and offset is taken
  from the ``spatial_shapes`` / ``level_start_index`` tensors, so a TorchScript ONNX export
  (``dynamo=False``, opset >= 16) keeps the input height/width dynamic.
- ``"plugin"``: one custom node ``dvis_trt::DvisMSDeformAttn`` (attributes
  ``plugin_version="1"``, ``plugin_namespace=""``) executed by our TensorRT plugin or its ONNX
  Runtime CPU twin. Eager forward = the reference.
- ``"trt-builtin"``: the same node as TensorRT's built-in ``MultiscaleDeformableAttnPlugin_TRT``
  (``plugin_version="2"``, the IPluginV3 version), for side-by-side runs.

Custom-node contract (both plugin modes), inputs as TensorRT's built-in plugin requires them:
``value`` (N,S,M,D) float, ``spatial_shapes`` **int32** (L,2), ``level_start_index`` **int32**
(L,), ``sampling_locations`` (N,Lq,M,L,P,2), ``attention_weights`` (N,Lq,M,L,P) (our plugin also
accepts int64 indices). Output: ours (N,Lq,M*D) as DESIGN.md says; the built-in one (N,Lq,M,D),
which the graph reshapes to (N,Lq,M*D) after the node. The exported graph casts the two index
tensors from int64 to int32 in front of the node, so one graph serves both.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvis_trt.plugins import identity

MSDA_MODES = ("eager", "onnx", "plugin", "trt-builtin")

# The node's identity is the plugin's (dvis_trt.plugins.identity): ONNX domain of the custom node
# (both plugin modes), op type / version of our plugin (``plugin`` mode) and of TensorRT's
# built-in plugin (``trt-builtin`` mode).
PLUGIN_DOMAIN = identity.ONNX_DOMAIN
PLUGIN_OP = identity.ONNX_OP_TYPE
PLUGIN_VERSION = identity.PLUGIN_VERSION
TRT_BUILTIN_OP = identity.TRT_BUILTIN_PLUGIN
TRT_BUILTIN_VERSION = identity.TRT_BUILTIN_VERSION
PLUGIN_NAMESPACE = identity.PLUGIN_NAMESPACE
#: ``custom_opsets`` argument for ``torch.onnx.export`` when a plugin mode is active.
MSDA_CUSTOM_OPSETS = {PLUGIN_DOMAIN: 1}

_mode = "eager"


def get_msda_mode() -> str:
    """Return the active MSDeformAttn mode (one of :data:`MSDA_MODES`)."""
    return _mode


@contextlib.contextmanager
def msda_mode(mode: str) -> Iterator[str]:
    """Select how :func:`ms_deform_attn` computes (and exports) inside the ``with`` block.

    ``mode``: ``"eager"`` | ``"onnx"`` | ``"plugin"`` | ``"trt-builtin"`` (see the module
    docstring). The previous mode is restored on exit, also on error. Not thread-safe (one
    module-level switch, as an export is a single-threaded affair).

    Raises ValueError for any other mode.
    """
    global _mode
    if mode not in MSDA_MODES:
        raise ValueError(f"msda_mode: unknown mode {mode!r}; use one of {', '.join(MSDA_MODES)}")
    previous = _mode
    _mode = mode
    try:
        yield mode
    finally:
        _mode = previous


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def _shapes_to_list(spatial_shapes: Union[Tensor, Sequence[Sequence[int]]]
                    ) -> List[Tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_core_pytorch(value: Tensor,
                                spatial_shapes_list: Union[Tensor, Sequence[Sequence[int]]],
                                sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """Reference MSDeformAttn (official ``ms_deform_attn_core_pytorch``).

    ``value`` (N,S,M,D) float; ``spatial_shapes_list`` L pairs ``(H_l, W_l)`` (ints, or an
    int tensor (L,2) that is read to ints); ``sampling_locations`` (N,Lq,M,L,P,2) ``(x, y)``
    normalised to [0, 1]; ``attention_weights`` (N,Lq,M,L,P). Returns (N,Lq,M*D), same dtype
    as ``value``. Bilinear, zero padding, ``align_corners=False`` on the grid ``2*loc-1``.

    Level sizes become Python ints, so a trace of this function has them baked in; use
    :func:`ms_deform_attn` in ``"onnx"`` mode for export.
    """
    shapes = _shapes_to_list(spatial_shapes_list)
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    grids = sampling_locations * 2 - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = levels[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N*M, D, Lq, P)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# export-friendly (pure ONNX) path
# --------------------------------------------------------------------------------------------
def ms_deform_attn_onnx(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                        sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """MSDeformAttn with level sizes taken from tensors (export mode ``"onnx"``).

    Same arguments and result as :func:`ms_deform_attn`; the arithmetic is the reference's
    (one ``grid_sample`` per level, weighted sum), so eager results are identical to
    :func:`ms_deform_attn_core_pytorch`. Level sizes ``H_l, W_l`` and offsets are 0-d tensors
    indexed out of ``spatial_shapes`` / ``level_start_index``: under the TorchScript tracer the
    slices and reshapes that use them are recorded as graph computations (Gather/Slice/Reshape
    on tensors), not constants, so one ONNX graph serves every input size. The number of
    levels ``L`` (from ``sampling_locations``) is static.
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    grids = sampling_locations * 2 - 1
    sampled = []
    for lvl, (grid_l, hw, start) in enumerate(zip(grids.unbind(3), spatial_shapes.unbind(0),
                                                   level_start_index.unbind(0))):
        h, w = hw.unbind(0)
        v = value[:, start:start + h * w]  # (N, H*W, M, D)
        v = v.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grid_l.transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# plugin paths: one custom node in the exported graph
# --------------------------------------------------------------------------------------------
def _plugin_symbolic(g, op: str, version: str, value, spatial_shapes, level_start_index,
                     sampling_locations, attention_weights, flat_heads: bool = False):
    """One custom node. ``flat_heads``: output declared (N, Lq, M*D) — our plugin's contract
    (DESIGN.md); else (N, Lq, M, D) — TensorRT's built-in plugin. The caller reshapes to
    (N, Lq, M*D) after the node either way."""
    from torch.onnx import symbolic_helper as sym_help

    int32 = 6  # onnx.TensorProto.INT32
    shapes32 = g.op("Cast", spatial_shapes, to_i=int32)
    start32 = g.op("Cast", level_start_index, to_i=int32)
    out = g.op(f"{PLUGIN_DOMAIN}::{op}", value, shapes32, start32, sampling_locations,
               attention_weights, plugin_version_s=version, plugin_namespace_s=PLUGIN_NAMESPACE)
    v_sizes = sym_help._get_tensor_sizes(value)
    l_sizes = sym_help._get_tensor_sizes(sampling_locations)
    if v_sizes is not None and l_sizes is not None and len(v_sizes) == 4 and len(l_sizes) >= 2:
        if flat_heads:
            md = v_sizes[2] * v_sizes[3] if v_sizes[2] is not None and v_sizes[3] is not None \
                else None
            out.setType(value.type().with_sizes([v_sizes[0], l_sizes[1], md]))
        else:
            out.setType(value.type().with_sizes([v_sizes[0], l_sizes[1], v_sizes[2], v_sizes[3]]))
    else:
        out.setType(value.type())
    return out


def _plugin_eager(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    # Runs opaquely inside the traced custom node (the exporter uses ``symbolic``), so reading
    # the level sizes to ints bakes nothing into the graph: silence the tracer's warning.
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        out = ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations,
                                          attention_weights)
    return out.view(n, lq, m, d)


class _PluginMSDeformAttn(torch.autograd.Function):
    """Eager: the reference, (N,Lq,M*D); export: one ``DvisMSDeformAttn`` node (3-D output)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        return _plugin_eager(value, spatial_shapes, sampling_locations,
                             attention_weights).flatten(2)

    @staticmethod
    def symbolic(g, value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights):
        return _plugin_symbolic(g, PLUGIN_OP, PLUGIN_VERSION, value, spatial_shapes,
                                level_start_index, sampling_locations, attention_weights,
                                flat_heads=True)


class _TrtBuiltinMSDeformAttn(torch.autograd.Function):
    """Eager: the reference, 4-D; export: one ``MultiscaleDeformableAttnPlugin_TRT`` node."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        return _plugin_eager(value, spatial_shapes, sampling_locations, attention_weights)

    @staticmethod
    def symbolic(g, value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights):
        return _plugin_symbolic(g, TRT_BUILTIN_OP, TRT_BUILTIN_VERSION, value, spatial_shapes,
                                level_start_index, sampling_locations, attention_weights)


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------
def _check_ranks(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 sampling_locations: Tensor, attention_weights: Tensor) -> None:
    want = {"value": (value, 4), "spatial_shapes": (spatial_shapes, 2),
            "level_start_index": (level_start_index, 1),
            "sampling_locations": (sampling_locations, 6),
            "attention_weights": (attention_weights, 5)}
    for name, (t, rank) in want.items():
        if not isinstance(t, Tensor) or t.dim() != rank:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"ms_deform_attn: {name} must be a {rank}-D tensor, got {got}")
    if torch.jit.is_tracing():
        return  # shape values are graph values while tracing; ranks were checked above
    if sampling_locations.shape[-1] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must end in (x, y), got shape "
                         f"{tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise ValueError("ms_deform_attn: attention_weights shape "
                         f"{tuple(attention_weights.shape)} must equal sampling_locations' "
                         f"without its last dim {tuple(sampling_locations.shape[:-1])}")
    if spatial_shapes.shape[0] != sampling_locations.shape[3] or \
            level_start_index.shape[0] != spatial_shapes.shape[0]:
        raise ValueError(f"ms_deform_attn: {sampling_locations.shape[3]} levels in "
                         f"sampling_locations but spatial_shapes {tuple(spatial_shapes.shape)} "
                         f"and level_start_index {tuple(level_start_index.shape)}")
    if spatial_shapes.dtype.is_floating_point or level_start_index.dtype.is_floating_point:
        raise ValueError("ms_deform_attn: spatial_shapes / level_start_index must be integer "
                         "tensors (int64)")


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention, computed as the active :func:`msda_mode` says.

    ``value`` (N,S,M,D) float; ``spatial_shapes`` int64 (L,2) ``[H_l, W_l]``;
    ``level_start_index`` int64 (L,); ``sampling_locations`` (N,Lq,M,L,P,2) ``(x, y)`` in
    [0, 1]; ``attention_weights`` (N,Lq,M,L,P). Returns (N,Lq,M*D) in ``value``'s dtype.
    Semantics: official ``MSDeformAttnFunction`` / ``ms_deform_attn_core_pytorch``.

    Raises ValueError when the tensors have the wrong ranks / inconsistent level counts.
    """
    _check_ranks(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    mode = _mode
    if mode == "eager":
        return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations,
                                           attention_weights)
    if mode == "onnx":
        return ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights)
    fn = _PluginMSDeformAttn if mode == "plugin" else _TrtBuiltinMSDeformAttn
    out = fn.apply(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights)  # ours (N, Lq, M*D); built-in (N, Lq, M, D)
    return out.flatten(2) if out.dim() == 4 else out


# --------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------
def _static_size(t: Tensor, dim: int) -> int:
    # a dimension the graph treats as fixed (read as a Python int, also while tracing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(t.shape[dim])


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (official ``MSDeformAttn``).

    Parameters (official names): ``sampling_offsets`` Linear(C, M*L*P*2), ``attention_weights``
    Linear(C, M*L*P), ``value_proj`` Linear(C, C), ``output_proj`` Linear(C, C), with
    ``C = d_model``, ``M = n_heads``, ``L = n_levels``, ``P = n_points``. Initialisation as the
    official ``_reset_parameters`` (irrelevant once a checkpoint is loaded).

    Raises ValueError when ``d_model`` is not divisible by ``n_heads``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads "
                             f"({n_heads})")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1):
            warnings.warn(f"MSDeformAttn: head dim {head_dim} is not a power of 2; CUDA kernels "
                          "are slower for such sizes", stacklevel=2)
        self.im2col_step = 128  # official attribute (CUDA kernel batching); unused here
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = dirs.view(self.n_heads, 1, 1, 2) * steps  # (M, 1, P, 2)
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: Tensor, input_level_start_index: Tensor,
                input_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Deformable attention of ``query`` over the flattened multi-level ``input_flatten``.

        ``query`` (N,Lq,C); ``reference_points`` (N or 1,Lq,L,2) normalised ``(x, y)`` in
        [0, 1] (padding area included), or (N,Lq,L,4) boxes ``(cx, cy, w, h)``;
        ``input_flatten`` (N,S,C); ``input_spatial_shapes`` int64 (L,2) ``[H, W]``;
        ``input_level_start_index`` int64 (L,); ``input_padding_mask`` (N,S) bool, True =
        padding, or None (the inference path: no padding mask). Returns (N,Lq,C).

        Raises ValueError when ``reference_points`` does not end in 2 or 4, or (eager only) when
        the spatial shapes do not add up to ``S``.
        """
        n, len_q, _ = query.shape
        len_in = input_flatten.shape[1]
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():
            total = int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum())
            if total != len_in:
                raise ValueError(f"MSDeformAttn: spatial shapes cover {total} positions but "
                                 f"input_flatten has {len_in}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels,
                                                    self.n_points, 2)
        weights = self.attention_weights(query).view(n, len_q, self.n_heads,
                                                     self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, len_q, self.n_heads, self.n_levels,
                                              self.n_points)
        ref_dim = _static_size(reference_points, -1)
        if ref_dim == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]],
                                     -1)
            locations = reference_points[:, :, None, :, None, :] \
                + offsets / normalizer[None, None, None, :, None, :]
        elif ref_dim == 4:
            locations = reference_points[:, :, None, :, None, :2] \
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError("MSDeformAttn: reference_points must end in 2 or 4 values, got "
                             f"shape {tuple(reference_points.shape)}")
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations,
                             weights)
        return self.output_proj(out)
