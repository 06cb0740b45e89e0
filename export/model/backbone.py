"""detectron2's ResNet backbone (R18/R34/R50/R101/R152), as DVIS-DAQ's R50 configs build it.

Semantics follow detectron2 ``modeling/backbone/resnet.py`` (``BasicStem``, ``BasicBlock``,
``BottleneckBlock``, ``ResNet``, ``build_resnet_backbone``), ``layers/wrappers.py``
(``Conv2d`` with a ``norm`` child and an optional activation) and ``layers/batch_norm.py``
(``FrozenBatchNorm2d``, ``get_norm``). Module names equal detectron2's, so the official
state dict (``backbone.stem.conv1.weight``, ``backbone.res2.0.conv1.norm.running_mean``,
``backbone.res2.0.shortcut.norm.bias``, ...) loads strictly. FrozenBN holds four buffers and no
``num_batches_tracked`` (detectron2 registers it as ``None``, so it is not in the checkpoint).

Deformable-conv blocks (``DEFORM_ON_PER_STAGE``) and the classification head are not ported:
the DVIS-DAQ configs use neither.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShapeSpec(NamedTuple):
    """Channels and stride (input pixels per feature pixel) of one feature map."""

    channels: int
    stride: int


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms (detectron2 ``FrozenBatchNorm2d``).

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` (C,), float32; initialised to
    the identity (``running_var = 1 - eps``). Forward on (N,C,H,W):
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` via
    ``F.batch_norm(training=False)`` (detectron2's inference path).
    Checkpoints from before detectron2's version 2 (no running stats) load with identity stats.
    """

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        # detectron2 takes this fused path whenever no gradient is needed (its inference);
        # its scale-and-shift branch for inputs that need gradients only saves training
        # memory. Always fusing keeps one ``BatchNormalization`` per conv in the exported graph
        # (the TorchScript exporter traces with gradients enabled), which ORT/TensorRT fold.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            # old (Caffe2-converted) checkpoints carry weight/bias only
            if prefix + "running_mean" not in state_dict:
                state_dict[prefix + "running_mean"] = torch.zeros_like(self.running_mean)
            if prefix + "running_var" not in state_dict:
                state_dict[prefix + "running_var"] = torch.ones_like(self.running_var)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, eps={self.eps}"


def get_norm(norm: Union[None, str, Callable[[int], nn.Module]], out_channels: int
             ) -> Optional[nn.Module]:
    """Normalisation layer by detectron2 name (``layers/batch_norm.py`` ``get_norm``).

    ``"FrozenBN"`` -> :class:`FrozenBatchNorm2d`; ``"BN"`` / ``"SyncBN"`` -> ``nn.BatchNorm2d``
    (identical at inference); ``"GN"`` -> ``nn.GroupNorm(32, C)``; ``""`` / None -> None; a
    callable is called with ``out_channels``. Raises ValueError for any other name.
    """
    if norm is None or norm == "":
        return None
    if callable(norm):
        return norm(out_channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(out_channels)
    if norm in ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN"):
        return nn.BatchNorm2d(out_channels)
    if norm == "GN":
        return nn.GroupNorm(32, out_channels)
    raise ValueError(f"get_norm: unsupported norm {norm!r}; use FrozenBN, BN, SyncBN, GN or ''")


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``norm`` child and ``activation`` (detectron2
    ``layers.Conv2d``). State-dict names: ``weight``, ``bias`` (when enabled), ``norm.*``.

    Input (N,C_in,H,W) -> (N,C_out,H',W'), usual convolution arithmetic.
    """

    def __init__(self, *args, norm: Optional[nn.Module] = None,
                 activation: Optional[Callable[[Tensor], Tensor]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------
class CNNBlockBase(nn.Module):
    """A block with known ``in_channels``, ``out_channels`` and ``stride`` (detectron2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride


class BasicStem(CNNBlockBase):
    """conv1 7x7 stride 2 pad 3 (no bias) + norm, relu, max-pool 3x3 stride 2 pad 1.

    (N,in_channels,H,W) -> (N,out_channels,ceil(ceil(H/2)/2),...) = stride 4.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm="FrozenBN"):
        super().__init__(in_channels, out_channels, 4)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3,
                            bias=False, norm=get_norm(norm, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BasicBlock(CNNBlockBase):
    """R18/R34 block: two 3x3 convs (+ norm), projection ``shortcut`` when channels differ."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1,
                 norm="FrozenBN"):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                   bias=False, norm=get_norm(norm, out_channels))
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1,
                            bias=False, norm=get_norm(norm, out_channels))
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1,
                            bias=False, norm=get_norm(norm, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class BottleneckBlock(CNNBlockBase):
    """R50+ block: 1x1 -> 3x3 (groups, dilation) -> 1x1, each with norm; projection
    ``shortcut`` (1x1, stride, norm) when ``in_channels != out_channels``.

    ``stride_in_1x1`` puts the block's stride in ``conv1`` (MSRA style) instead of ``conv2``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int,
                 stride: int = 1, num_groups: int = 1, norm="FrozenBN",
                 stride_in_1x1: bool = False, dilation: int = 1):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                   bias=False, norm=get_norm(norm, out_channels))
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1,
                            bias=False, norm=get_norm(norm, bottleneck_channels))
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3,
                            stride=stride_3x3, padding=dilation, bias=False, groups=num_groups,
                            dilation=dilation, norm=get_norm(norm, bottleneck_channels))
        self.conv3 = Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                            norm=get_norm(norm, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------
_STAGE_INDEX = {"stem": 0, "res2": 1, "res3": 2, "res4": 3, "res5": 4}
_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3],
                     101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class ResNet(nn.Module):
    """detectron2 ``ResNet``: ``stem`` then stages ``res2``.. (``nn.Sequential`` of blocks).

    Stages after the deepest requested output are not built (as detectron2 does).
    Forward: images (N,3,H,W) float32 (normalised, padded) -> dict name -> (N,C,H/s,W/s) for
    each name in ``out_features`` (strides: stem/res2 4, res3 8, res4 16, res5 32 or 16 with
    res5 dilation 2; sizes round up at each stride-2 step).
    """

    def __init__(self, stem: CNNBlockBase, stages: Sequence[Sequence[CNNBlockBase]],
                 out_features: Sequence[str]):
        super().__init__()
        if not out_features:
            raise ValueError("ResNet: out_features is empty; name at least one of "
                             "stem, res2, res3, res4, res5")
        bad = [f for f in out_features if f not in _STAGE_INDEX]
        if bad:
            raise ValueError(f"ResNet: unknown out_features {bad}; use stem, res2..res5")
        self.stem = stem
        stride = stem.stride
        self._strides = {"stem": stride}
        self._channels = {"stem": stem.out_channels}
        num_stages = max(_STAGE_INDEX[f] for f in out_features)
        if num_stages > len(stages):
            raise ValueError(f"ResNet: out_features {list(out_features)} need {num_stages} "
                             f"stages, only {len(stages)} given")
        self.stage_names: List[str] = []
        for i, blocks in enumerate(stages[:num_stages]):
            name = f"res{i + 2}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            for block in blocks:
                stride *= block.stride
            self._strides[name] = stride
            self._channels[name] = blocks[-1].out_channels
        self._out_features = list(out_features)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"ResNet: expected images (N, C, H, W), got shape {tuple(x.shape)}")
        outputs: Dict[str, Tensor] = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` for every output feature (a tuple subclass)."""
        return {f: ShapeSpec(self._channels[f], self._strides[f]) for f in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 0  # detectron2 Backbone default; the meta-architecture pads to 32 itself


def build_resnet(depth: int = 50, stem_out_channels: int = 64, res2_out_channels: int = 256,
                 num_groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False,
                 res5_dilation: int = 1,
                 out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
                 norm: Union[str, Callable[[int], nn.Module]] = "FrozenBN",
                 in_channels: int = 3) -> ResNet:
    """Build the ResNet of detectron2 ``build_resnet_backbone`` from ``MODEL.RESNETS.*`` values.

    ``depth`` 18/34 (BasicBlock; needs ``res2_out_channels == 64``, ``num_groups == 1``,
    ``res5_dilation == 1``) or 50/101/152 (BottleneckBlock with ``num_groups *
    width_per_group`` bottleneck channels in res2, doubling per stage). ``res5_dilation`` 1 or
    2 (2 keeps res5 at stride 16). ``norm`` as :func:`get_norm`. R50 OVIS config: depth 50,
    stem 64, res2 256, groups 1, width 64, stride_in_1x1 False, dilation 1, FrozenBN.

    Raises ValueError for unsupported combinations (with the offending value).
    """
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"build_resnet: depth {depth} not supported; use 18, 34, 50, 101, 152")
    if res5_dilation not in (1, 2):
        raise ValueError(f"build_resnet: res5_dilation must be 1 or 2, got {res5_dilation}")
    if depth in (18, 34) and (res2_out_channels != 64 or num_groups != 1 or res5_dilation != 1):
        raise ValueError(f"build_resnet: R{depth} needs res2_out_channels=64, num_groups=1, "
                         f"res5_dilation=1 (got {res2_out_channels}, {num_groups}, "
                         f"{res5_dilation})")
    stem = BasicStem(in_channels, stem_out_channels, norm=norm)
    blocks_per_stage = _BLOCKS_PER_STAGE[depth]
    in_ch, out_ch = stem_out_channels, res2_out_channels
    bottleneck = num_groups * width_per_group
    stages = []
    for idx, stage_idx in enumerate(range(2, 6)):
        dilation = res5_dilation if stage_idx == 5 else 1
        first_stride = 1 if idx == 0 or (stage_idx == 5 and dilation == 2) else 2
        blocks: List[CNNBlockBase] = []
        for b in range(blocks_per_stage[idx]):
            stride = first_stride if b == 0 else 1
            if depth in (18, 34):
                blocks.append(BasicBlock(in_ch, out_ch, stride=stride, norm=norm))
            else:
                blocks.append(BottleneckBlock(in_ch, out_ch, bottleneck_channels=bottleneck,
                                              stride=stride, num_groups=num_groups, norm=norm,
                                              stride_in_1x1=stride_in_1x1, dilation=dilation))
            in_ch = out_ch
        stages.append(blocks)
        out_ch *= 2
        bottleneck *= 2
    return ResNet(stem, stages, out_features=out_features)
