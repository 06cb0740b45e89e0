"""detectron2 ResNet port (``export/model/backbone.py``).

Independent checks: the official state-dict rows (names, shapes, order) of the R50 OVIS model,
``FrozenBatchNorm2d`` against ``nn.BatchNorm2d`` in eval mode, and the whole network against a
functional float64 re-implementation written here from detectron2's description (explicit
``(x - mean) / sqrt(var + eps) * w + b``, strides / dilation placed by hand), plus the
stride/size arithmetic of each output.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvis_trt.export.model.backbone import (
    FrozenBatchNorm2d,
    ShapeSpec,
    build_resnet,
)

REF = Path(os.environ.get("DVIS_TRT_REFERENCE", "/work/shared/reference"))
R50_KEYS = REF / "dvis_daq_offline_r50_ovis.keys.tsv"
R50_YAML = REF / "dvis_daq_offline_r50_ovis.resolved.yaml"
needs_ref = pytest.mark.skipif(not (R50_KEYS.is_file() and R50_YAML.is_file()),
                               reason="reference data (DVIS_TRT_REFERENCE) not present")


def r50_kwargs():
    """build_resnet kwargs from MODEL.RESNETS of the resolved R50 OVIS config."""
    import yaml

    r = yaml.safe_load(R50_YAML.read_text())["MODEL"]["RESNETS"]
    return dict(depth=r["DEPTH"], stem_out_channels=r["STEM_OUT_CHANNELS"],
                res2_out_channels=r["RES2_OUT_CHANNELS"], num_groups=r["NUM_GROUPS"],
                width_per_group=r["WIDTH_PER_GROUP"], stride_in_1x1=r["STRIDE_IN_1X1"],
                res5_dilation=r["RES5_DILATION"], out_features=r["OUT_FEATURES"], norm=r["NORM"])


# ----------------------------------------------------------------------------- state dict
@needs_ref
def test_r50_state_dict_equals_official_rows():
    kw = r50_kwargs()
    assert kw["depth"] == 50 and kw["norm"] == "FrozenBN" and kw["stride_in_1x1"] is False
    model = build_resnet(**kw)  # no forward at full size
    want = []
    for line in R50_KEYS.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        if name.startswith("backbone."):
            want.append((name[len("backbone."):], tuple(int(x) for x in shape.split(",")), dtype))
    got = [(k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
           for k, v in model.state_dict().items()]
    assert got == want  # names, shapes, dtypes and order (265 rows)
    assert not any(k.endswith("num_batches_tracked") for k, _, _ in got)
    # README of the reference data: backbone 23,454,912 parameters (+ FrozenBN buffers)
    assert sum(p.numel() for p in model.parameters()) == 23_454_912
    assert model.output_shape() == {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16),
                                    "res5": (2048, 32)}


def test_r101_and_resnext_structure():
    r101 = build_resnet(depth=101)
    assert [len(getattr(r101, f"res{i}")) for i in range(2, 6)] == [3, 4, 23, 3]
    assert r101.res4[22].conv3.weight.shape == (1024, 256, 1, 1)
    x = build_resnet(depth=50, num_groups=32, width_per_group=4)  # ResNeXt-50 32x4d
    assert x.res2[0].conv2.weight.shape == (128, 4, 3, 3) and x.res2[0].conv2.groups == 32
    assert x.res5[0].conv1.weight.shape == (1024, 1024, 1, 1)
    r18 = build_resnet(depth=18, res2_out_channels=64)
    assert r18.res2[0].shortcut is None and r18.res3[0].shortcut.weight.shape == (128, 64, 1, 1)
    assert r18.output_shape()["res5"] == ShapeSpec(512, 32)


def test_unused_stages_are_not_built():
    m = build_resnet(depth=50, out_features=["res3"])
    assert hasattr(m, "res3") and not hasattr(m, "res4") and not hasattr(m, "res5")
    assert not any(k.startswith("res4") for k in m.state_dict())


# ----------------------------------------------------------------------------- FrozenBN
def test_frozen_bn_equals_eval_batchnorm():
    g = torch.Generator().manual_seed(0)
    c = 7
    fbn = FrozenBatchNorm2d(c)
    bn = nn.BatchNorm2d(c, eps=1e-5).eval()
    stats = dict(weight=torch.randn(c, generator=g), bias=torch.randn(c, generator=g),
                 running_mean=torch.randn(c, generator=g),
                 running_var=torch.rand(c, generator=g) + 0.1)
    fbn.load_state_dict(stats)
    bn.load_state_dict({**stats, "num_batches_tracked": torch.tensor(0)})
    x = torch.randn(3, c, 5, 4, generator=g)
    # same formula evaluated by the same kind of kernel: a few float32 ulps at most
    torch.testing.assert_close(fbn(x), bn(x), rtol=1e-6, atol=1e-6)
    x.requires_grad_(True)
    torch.testing.assert_close(fbn(x), bn(x), rtol=1e-6, atol=1e-6)
    explicit = (x - stats["running_mean"].view(1, -1, 1, 1)) / torch.sqrt(
        stats["running_var"].view(1, -1, 1, 1) + 1e-5) * stats["weight"].view(1, -1, 1, 1) \
        + stats["bias"].view(1, -1, 1, 1)
    torch.testing.assert_close(fbn(x), explicit, rtol=1e-5, atol=1e-5)


def test_frozen_bn_buffers_identity_init_and_old_checkpoints():
    fbn = FrozenBatchNorm2d(4)
    assert set(fbn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(fbn.parameters()) == []  # frozen: buffers only
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fbn(x), x)  # running_var = 1 - eps: identity
    # a detectron2 version-1 (Caffe2-converted) entry has no running stats: identity stats
    sd = OrderedDict(weight=torch.full((4,), 2.0), bias=torch.ones(4))
    sd._metadata = {"": {"version": 1}}
    fbn.load_state_dict(sd)
    assert torch.equal(fbn.running_mean, torch.zeros(4))
    assert torch.equal(fbn.running_var, torch.ones(4))


# ----------------------------------------------------------------------------- forward
def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5
        elif k.endswith("running_mean") or k.endswith("norm.bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        elif k.endswith("norm.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        else:  # conv weights, He-scaled so activations stay O(1) through the blocks
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g, dtype=v.dtype) * math.sqrt(1.0 / fan_in)
    model.load_state_dict(sd)
    return sd


def _f_conv_norm(x, sd, prefix, stride=1, padding=0, dilation=1, groups=1):
    x = F.conv2d(x, sd[prefix + ".weight"], None, stride, padding, dilation, groups)
    mean, var = sd[prefix + ".norm.running_mean"], sd[prefix + ".norm.running_var"]
    w, b = sd[prefix + ".norm.weight"], sd[prefix + ".norm.bias"]
    return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5) \
        * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def functional_resnet(x, sd, depth, blocks, stride_in_1x1=False, res5_dilation=1, groups=1):
    """detectron2's ResNet written out with F.conv2d on the state dict (float64)."""
    out = {}
    x = F.relu(_f_conv_norm(x, sd, "stem.conv1", stride=2, padding=3))
    x = F.max_pool2d(x, 3, 2, 1)
    for s, n_blocks in enumerate(blocks):
        name = f"res{s + 2}"
        dil = res5_dilation if name == "res5" else 1
        for b in range(n_blocks):
            p = f"{name}.{b}"
            stride = 2 if (b == 0 and s > 0 and dil == 1) else 1
            if p + ".shortcut.weight" in sd:
                short = _f_conv_norm(x, sd, p + ".shortcut", stride=stride)
            else:
                short = x
            if depth < 50:
                y = F.relu(_f_conv_norm(x, sd, p + ".conv1", stride=stride, padding=1))
                y = _f_conv_norm(y, sd, p + ".conv2", padding=1)
            else:
                s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
                y = F.relu(_f_conv_norm(x, sd, p + ".conv1", stride=s1))
                y = F.relu(_f_conv_norm(y, sd, p + ".conv2", stride=s3, padding=dil,
                                        dilation=dil, groups=groups))
                y = _f_conv_norm(y, sd, p + ".conv3")
            x = F.relu(y + short)
        out[name] = x
    return out


VARIANTS = {
    # tiny widths, R50 block counts / rules
    "r50": dict(depth=50, stem_out_channels=8, res2_out_channels=16, width_per_group=4),
    "msra_dilated_grouped": dict(depth=50, stem_out_channels=8, res2_out_channels=16,
                                 num_groups=2, width_per_group=4, stride_in_1x1=True,
                                 res5_dilation=2),
    "r18": dict(depth=18, stem_out_channels=8, res2_out_channels=64),
}
BLOCKS = {50: [3, 4, 6, 3], 18: [2, 2, 2, 2]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_functional_float64(variant):
    kw = VARIANTS[variant]
    model = build_resnet(**kw).double().eval()
    sd = _randomise(model, seed=len(variant))
    x = torch.randn(2, 3, 45, 62, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(x)
        want = functional_resnet(x, sd, kw["depth"], BLOCKS[kw["depth"]],
                                 kw.get("stride_in_1x1", False), kw.get("res5_dilation", 1),
                                 kw.get("num_groups", 1))
    assert list(got) == ["res2", "res3", "res4", "res5"]
    for k in got:
        assert got[k].shape == want[k].shape, k
        # float64 end to end; only summation order differs (the BN formula is arranged
        # differently): ~1e-14 relative, 1e-9 is far below any wiring error
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9)
        assert want[k].abs().max() > 1e-2  # activations did not die out


@pytest.mark.parametrize("hw", [(64, 96), (61, 83), (33, 32)])
def test_output_sizes_follow_strides(hw):
    model = build_resnet(depth=50, stem_out_channels=8, res2_out_channels=16,
                         width_per_group=4, res5_dilation=2,
                         out_features=["stem", "res2", "res3", "res4", "res5"]).eval()
    shapes = model.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"stem": 4, "res2": 4, "res3": 8,
                                                        "res4": 16, "res5": 16}
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    for name, t in out.items():
        c, s = shapes[name]
        # every stride-2 step (7x7 pad 3, max-pool 3 pad 1, 3x3 pad 1, 1x1) maps n -> ceil(n/2)
        assert tuple(t.shape) == (1, c, math.ceil(hw[0] / s), math.ceil(hw[1] / s)), name


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="depth"):
        build_resnet(depth=42)
    with pytest.raises(ValueError, match="res5_dilation"):
        build_resnet(res5_dilation=3)
    with pytest.raises(ValueError, match="R18"):
        build_resnet(depth=18, res2_out_channels=256)
    with pytest.raises(ValueError, match="unknown out_features"):
        build_resnet(out_features=["res6"])
    model = build_resnet(depth=18, res2_out_channels=64, out_features=["res2"])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.randn(3, 32, 32))


def test_onnx_export_keeps_spatial_size_dynamic(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = build_resnet(depth=50, stem_out_channels=8, res2_out_channels=16, width_per_group=4)
    model.eval()
    _randomise(model, 1)
    names = ["res2", "res3", "res4", "res5"]
    path = tmp_path / "backbone.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=names,
                          dynamic_axes={"images": {0: "T", 2: "Hp", 3: "Wp"}})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") + ops.count("Conv") > 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for hw in [(96, 64), (61, 83)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want = model(x)
        got = sess.run(None, {"images": x.numpy()})
        for name, g in zip(names, got):
            # float32 convs of different libraries (oneDNN vs MLAS) reorder sums: ~1e-6 here
            np.testing.assert_allclose(g, want[name].numpy(), rtol=1e-4, atol=1e-4)
