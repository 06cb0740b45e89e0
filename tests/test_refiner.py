"""Tests of the offline temporal refiner port (export/model/refiner.py).

The reference below is an independent, literal re-implementation of the official
``dvis_daq/refiner.py::TemporalRefiner.forward`` + ``prediction`` (inference branch) in the
official ``(b, c, t, q)`` layout, with attention, LayerNorm and the FFN written out from the
raw parameters (no nn.MultiheadAttention, no shared layers), so it shares no code with the
port except the parameter tensors.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dvis_trt.export.model.refiner import TemporalRefiner

REF = Path("/work/shared/reference")
TINY = dict(hidden_channel=16, feedforward_channel=32, num_head=2, decoder_layer_num=2,
            mask_dim=16, class_num=3, windows=3)


# --------------------------------------------------------------------------- helpers
def _spread(model: TemporalRefiner, seed: int) -> TemporalRefiner:
    """Perturb every parameter (biases of attention start at 0, LayerNorms at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _mha(query, key, value, attn, nhead):
    """Sequence-first multi-head attention from raw in/out projections. (Lq,B,C),(Lk,B,C)->(Lq,B,C)."""
    c = query.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = query @ w[:c].T + b[:c]
    k = key @ w[c:2 * c].T + b[c:2 * c]
    v = value @ w[2 * c:].T + b[2 * c:]
    d = c // nhead
    out = torch.empty_like(q)
    for bi in range(query.shape[1]):
        for h in range(nhead):
            sl = slice(h * d, (h + 1) * d)
            scores = q[:, bi, sl] @ k[:, bi, sl].T / math.sqrt(d)
            out[:, bi, sl] = torch.softmax(scores, dim=-1) @ v[:, bi, sl]
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def _replicate_conv1d(x, conv):
    """Conv1d with 'same' replicate padding, padding built by index clamping. (N,C,T)->(N,C,T)."""
    k = conv.weight.shape[-1]
    left = (k - 1) // 2
    t = x.shape[-1]
    idx = torch.clamp(torch.arange(-left, t + (k - 1 - left)), 0, t - 1)
    return F.conv1d(x[..., idx], conv.weight, conv.bias)


def official_reference(m: TemporalRefiner, instance_embeds, padding_mask, frame_embeds, mask_features):
    """Literal official inference path, batch-capable.

    instance_embeds (b,c,t,q), padding_mask (b,q,t) bool, frame_embeds (b,c,t,Q),
    mask_features (b,t,c,h,w) -> pred_logits (b,t,q,K+1), pred_masks (b,q,t,h,w).
    ``padding_mask`` is accepted and, like in the official code (its uses are commented out,
    ``pred_class`` ignores it), not read.
    """
    del padding_mask
    nh = m.num_heads
    n_batch, n_channel, n_frames, n_instance = instance_embeds.shape
    output = instance_embeds
    memory = frame_embeds.permute(3, 0, 2, 1).flatten(1, 2)          # (Q, bt, c)
    for i in range(m.num_layers):
        output = output.permute(2, 0, 3, 1).flatten(1, 2)            # (t, bq, c)
        ta = m.transformer_time_self_attention_layers[i]
        output = _layer_norm(output + _mha(output, output, output, ta.self_attn, nh), ta.norm)
        output = output.permute(1, 2, 0)                              # (bq, c, t)
        if m.use_local_attn:
            seq = m.conv_short_aggregate_layers[i]
            y = _replicate_conv1d(torch.relu(_replicate_conv1d(output, seq[0])), seq[2])
            output = _layer_norm((y + output).transpose(1, 2), m.conv_norms[i]).transpose(1, 2)
        output = output.reshape(n_batch, n_instance, n_channel, n_frames).permute(1, 0, 3, 2).flatten(1, 2)
        oa = m.transformer_obj_self_attention_layers[i]
        output = _layer_norm(output + _mha(output, output, output, oa.self_attn, nh), oa.norm)
        ca = m.transformer_cross_attention_layers[i]
        output = _layer_norm(output + _mha(output, memory, memory, ca.multihead_attn, nh), ca.norm)
        ff = m.transformer_ffn_layers[i]
        hidden = torch.relu(output @ ff.linear1.weight.T + ff.linear1.bias)
        output = _layer_norm(output + hidden @ ff.linear2.weight.T + ff.linear2.bias, ff.norm)
        output = output.reshape(n_instance, n_batch, n_frames, n_channel).permute(1, 3, 2, 0)  # (b,c,t,q)
    # prediction (inference): last layer, decoder_norm, (b, t, q, c)
    dec = _layer_norm(output.permute(0, 2, 3, 1), m.decoder_norm)
    act = (dec @ m.activation_proj.weight.T + m.activation_proj.bias).softmax(dim=1)
    pooled = (dec * act).sum(dim=1, keepdim=True).repeat(1, n_frames, 1, 1)
    pred_logits = pooled @ m.class_embed.weight.T + m.class_embed.bias         # (b, t, q, K+1)
    x = dec
    for j, lin in enumerate(m.mask_embed.layers):
        x = x @ lin.weight.T + lin.bias
        if j < len(m.mask_embed.layers) - 1:
            x = torch.relu(x)
    pred_masks = torch.einsum("btqc,btchw->bqthw", x, mask_features)
    return pred_logits, pred_masks


def _keys_tsv(name):
    rows = []
    for line in (REF / f"dvis_daq_offline_{name}_ovis.keys.tsv").read_text().splitlines():
        key, shape, _ = line.split("\t")
        if key.startswith("refiner."):
            rows.append((key[len("refiner."):], tuple(int(s) for s in shape.split(",") if s)))
    return rows


def _kwargs_from_config(name):
    cfg = yaml.safe_load((REF / f"dvis_daq_offline_{name}_ovis.resolved.yaml").read_text())["MODEL"]
    mf = cfg["MASK_FORMER"]
    return dict(hidden_channel=mf["HIDDEN_DIM"], feedforward_channel=mf["DIM_FEEDFORWARD"],
                num_head=mf["NHEADS"], decoder_layer_num=cfg["REFINER"]["DECODER_LAYERS"],
                mask_dim=mf["HIDDEN_DIM"], class_num=cfg["SEM_SEG_HEAD"]["NUM_CLASSES"],
                windows=mf["TEST"]["WINDOW_SIZE"], use_local_attn=cfg["VIDEO_HEAD"]["USE_LOCAL_ATTN"])


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name,local", [("r50", False), ("vitl", True)])
def test_state_dict_matches_official(name, local):
    kwargs = _kwargs_from_config(name)
    assert kwargs["use_local_attn"] is local  # the two configs cover both variants
    with torch.device("meta"):
        model = TemporalRefiner(**kwargs)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == _keys_tsv(name)  # same names, shapes and order


@pytest.mark.parametrize("local", [False, True])
def test_stages_match_official_reference(local):
    # float64 on both sides: the port and the reference differ only in summation order, so
    # agreement to 1e-10 shows identical semantics (a wrong permute gives O(1) errors).
    torch.manual_seed(1)
    m = _spread(TemporalRefiner(**TINY, use_local_attn=local), seed=2).double()
    b, c, t, q, nq, h, w = 2, TINY["hidden_channel"], 6, 5, 7, 4, 3
    inst = torch.randn(b, c, t, q, dtype=torch.float64)
    frames = torch.randn(b, c, t, nq, dtype=torch.float64)
    feats = torch.randn(b, t, c, h, w, dtype=torch.float64)
    padding = torch.rand(b, q, t) > 0.5
    ref_logits, ref_masks = official_reference(m, inst, padding, frames, feats)
    assert torch.allclose(ref_logits, ref_logits[:, :1].expand_as(ref_logits))  # same every frame
    with torch.no_grad():
        for bi in range(b):  # our stages are batch-1; batch items must not mix in the reference
            logits, mask_embed = m.forward_stage(inst[bi].permute(1, 2, 0), frames[bi].permute(1, 2, 0))
            masks = m.mask_head(mask_embed, feats[bi])
            assert logits.shape == (q, TINY["class_num"] + 1) and mask_embed.shape == (t, q, c)
            torch.testing.assert_close(logits, ref_logits[bi, 0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(masks, ref_masks[bi], rtol=1e-10, atol=1e-10)


def test_padded_frames_are_not_masked():
    # Official behaviour: the padding mask is ignored, so the content of a padded frame
    # reaches the other frames and the pooled class logits.
    m = _spread(TemporalRefiner(**TINY), seed=3)
    inst, frames = torch.randn(5, 4, 16), torch.randn(5, 6, 16)
    changed = inst.clone()
    changed[0, 2] += 1.0  # frame 0 of instance 2, as if it were padding
    with torch.no_grad():
        a, ea = m.forward_stage(inst, frames)
        b, eb = m.forward_stage(changed, frames)
    assert (a[2] - b[2]).abs().max() > 1e-4 and (ea[1:, 2] - eb[1:, 2]).abs().max() > 1e-4


def test_padding_embed_is_identity():
    m = TemporalRefiner(**TINY)
    x = torch.randn(16)
    assert isinstance(m.padding_embed, torch.nn.Identity) and m.padding_embed(x) is x


def test_windowed_masks_equal_unwindowed():
    torch.manual_seed(4)
    m = _spread(TemporalRefiner(**TINY), seed=5)
    t, qs, c, h, w = 7, 5, 16, 4, 6
    emb, feats = torch.randn(t, qs, c), torch.randn(t, c, h, w)
    direct = torch.stack([(emb[i] @ feats[i].reshape(c, h * w)).reshape(qs, h, w) for i in range(t)], 1)
    with torch.no_grad():
        whole = m.mask_head(emb, feats)
        # per-frame matmul of the same rows: only float32 summation order can differ
        torch.testing.assert_close(whole, direct, rtol=1e-5, atol=1e-5)
        for win in (1, 2, 3, 7, 10):
            torch.testing.assert_close(m.windows_prediction(emb, feats, windows=win), whole,
                                       rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    m = TemporalRefiner(**TINY)
    with pytest.raises(ValueError, match="different numbers of frames"):
        m.forward_stage(torch.randn(4, 3, 16), torch.randn(5, 6, 16))
    with pytest.raises(ValueError, match="instance_embeds must be"):
        m.forward_stage(torch.randn(4, 3, 8), torch.randn(4, 6, 16))
    with pytest.raises(ValueError, match="mask_features must be"):
        m.mask_head(torch.randn(4, 3, 16), torch.randn(4, 8, 2, 2))
    with pytest.raises(ValueError, match="windows must be"):
        m.windows_prediction(torch.randn(4, 3, 16), torch.randn(4, 16, 2, 2), windows=0)
    with pytest.raises(ValueError, match="does not divide"):
        TemporalRefiner(hidden_channel=10, num_head=3)


class _MaskHead(torch.nn.Module):
    def __init__(self, refiner):
        super().__init__()
        self.refiner = refiner

    def forward(self, mask_embed, mask_features):
        return self.refiner.mask_head(mask_embed, mask_features)


# Needs attention layers whose traced graph keeps the key length symbolic: with torch 2.13's
# nn.MultiheadAttention, the packed in-projection path (key is value, no pos) bakes the
# export-time key length into a Reshape, and ORT fails at any other L / Qr.
@pytest.mark.parametrize("local", [False, True])
def test_onnx_export_dynamic_shapes(local, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(6)
    m = _spread(TemporalRefiner(**TINY, use_local_attn=local), seed=7)
    nq, c = 6, TINY["hidden_channel"]
    path = tmp_path / "refiner.onnx"
    with torch.no_grad():
        torch.onnx.export(m, (torch.randn(4, 3, c), torch.randn(4, nq, c)), str(path),
                          dynamo=False, opset_version=17,
                          input_names=["instance_embeds", "frame_embeds"],
                          output_names=["pred_logits", "mask_embed"],
                          dynamic_axes={"instance_embeds": {0: "L", 1: "Qr"}, "frame_embeds": {0: "L"},
                                        "pred_logits": {0: "Qr"}, "mask_embed": {0: "L", 1: "Qr"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # float32 on both sides, different kernels (ORT vs ATen): errors ~1e-6 on O(1..10) values.
    for L, qr in ((7, 5), (1, 9), (2, 2)):
        inst, frames = torch.randn(L, qr, c), torch.randn(L, nq, c)
        logits, emb = sess.run(None, {"instance_embeds": inst.numpy(), "frame_embeds": frames.numpy()})
        with torch.no_grad():
            e_logits, e_emb = m.forward_stage(inst, frames)
        np.testing.assert_allclose(logits, e_logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(emb, e_emb.numpy(), rtol=1e-4, atol=1e-4)

    head_path = tmp_path / "mask_head.onnx"
    with torch.no_grad():
        torch.onnx.export(_MaskHead(m), (torch.randn(3, 4, c), torch.randn(3, c, 5, 6)), str(head_path),
                          dynamo=False, opset_version=17,
                          input_names=["mask_embed", "mask_features"], output_names=["pred_masks"],
                          dynamic_axes={"mask_embed": {0: "t", 1: "Qs"},
                                        "mask_features": {0: "t", 2: "h", 3: "w"},
                                        "pred_masks": {0: "Qs", 1: "t", 2: "h", 3: "w"}})
    head = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
    for t, qs, h, w in ((2, 7, 3, 8), (5, 1, 6, 4)):
        emb, feats = torch.randn(t, qs, c), torch.randn(t, c, h, w)
        (masks,) = head.run(None, {"mask_embed": emb.numpy(), "mask_features": feats.numpy()})
        np.testing.assert_allclose(masks, m.mask_head(emb, feats).numpy(), rtol=1e-4, atol=1e-4)
