"""Shared transformer layers: the export-time attention equals nn.MultiheadAttention."""
import pytest
import torch
from torch import nn

from dvis_trt.export.model.layers import masked_attention_bias, multi_head_attention


@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "padding"])
def test_plain_attention_equals_module(mask_kind):
    torch.manual_seed(0)
    e, h, b, lq, lk = 16, 4, 2, 5, 7
    attn = nn.MultiheadAttention(e, h).eval()
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    q, k, v = torch.randn(lq, b, e), torch.randn(lk, b, e), torch.randn(lk, b, e)
    am = kpm = None
    if mask_kind == "bool":
        am = torch.rand(b * h, lq, lk) < 0.4
        am[..., 0] = False  # no fully blocked row (both would give NaN)
    elif mask_kind == "float":
        am = torch.randn(b * h, lq, lk)
    elif mask_kind == "padding":
        kpm = torch.zeros(b, lk, dtype=torch.bool)
        kpm[1, 4:] = True
    ref = attn(q, k, v, attn_mask=am, key_padding_mask=kpm, need_weights=False)[0]
    got = multi_head_attention(attn, q, k, v, am, kpm)
    # same math, different op order (scale before/after the matmul): float32 rounding only
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_masked_attention_bias_follows_official_rule():
    torch.manual_seed(1)
    b, q, k, nhead = 2, 3, 6, 4
    logits = torch.randn(b, q, k)
    logits[0, 1] = -5.0  # a query whose keys are all blocked: must become unmasked
    bias = masked_attention_bias(logits, nhead)
    # official: bool mask repeated per head, then fully blocked rows reset to False
    ref = (logits.sigmoid().unsqueeze(1).repeat(1, nhead, 1, 1).flatten(0, 1) < 0.5).bool()
    ref[torch.where(ref.sum(-1) == ref.shape[-1])] = False
    assert bias.shape == (b * nhead, q, k)
    assert torch.equal(torch.isinf(bias), ref)
    assert torch.all(bias[~ref] == 0)
    assert not torch.isinf(bias[0:nhead, 1]).any()
