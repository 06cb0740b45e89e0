"""Random-but-useful weights for tests, the demo and benchmarks.

A plainly random DVIS-DAQ collapses: the decoder's queries end up pointing one way (mean pairwise
cosine ~0.999), every query predicts the same mask and score, the tracker births duplicates and
the final top-K picks among ties — useless for checking that two implementations agree. Following
the recipe of DESIGN.md, :func:`spread_weights_` rescales a seeded random init so queries stay
distinct, masks are local, and class scores straddle the selection thresholds, so a short clip
really births, keeps, kills and pads tracks.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def spread_weights_(model: nn.Module, seed: int = 0, residual_scale: float = 0.1,
                    class_scale: float = 5.0, no_object_bias: float = 8.0,
                    qk_scale: float = 4.0, tracker_cross_scale: float = 1.0, pos_scale: float = 30.0,
                    tracker_no_object_bias: float | None = None
                    ) -> nn.Module:
    """Rescale a (random-init) ``DvisDaqOffline`` in place so its outputs spread.

    - attention output projections and FFN second linears of predictor, tracker and refiner
      are scaled by ``residual_scale`` (the residual stream keeps each query's identity);
    - the segmenter's and tracker's class weights are scaled by ``class_scale`` and the
      no-object logit gets ``+no_object_bias``, so foreground scores straddle the thresholds
      (the refiner's are scaled the same way so its top-K is not a tie);
    - mask-feature and last mask-embed projections get their row mean removed (masks cover
      parts of the frame, not all of it);
    - the tracker's cross-attention q/k projections are scaled by ``qk_scale`` and the last
      layer of its ``pos_embed`` MLP by ``pos_scale`` (bias zeroed): the new-instance queries
      are identical copies and only their pooled-mask position embeds tell them apart;
    - query features/embeddings are re-drawn from N(0, 1) with ``seed``.
    The defaults were tuned on ``export/configs/tiny.yaml`` with the synthetic scene of
    :mod:`dvis_trt.runtime.synthetic` (12 frames): ~40 tracks born over several frames, ~half
    killed after 8 misses, short ones noise-filtered, the refiner's top-K mixing tracks and
    fill queries, no two distinct final queries with mask IoU > 0.9. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    pred = model.sem_seg_head.predictor
    for part in (pred, model.tracker, model.refiner):
        for name, mod in part.named_modules():
            if isinstance(mod, nn.MultiheadAttention):
                if part is model.tracker and name.startswith("transformer_cross_attention_layers"):
                    # new-instance queries are identical copies: only this attention (with
                    # their pooled-mask position embeds) tells them apart, so keep it strong
                    mod.out_proj.weight.mul_(tracker_cross_scale)
                    continue
                mod.out_proj.weight.mul_(residual_scale)
            elif name.endswith("linear2") and isinstance(mod, nn.Linear):
                mod.weight.mul_(residual_scale)
    trk_bias = no_object_bias if tracker_no_object_bias is None else tracker_no_object_bias
    for head, bias in ((pred.class_embed, no_object_bias), (model.tracker.class_embed, trk_bias),
                       (model.refiner.class_embed, no_object_bias)):
        head.weight.mul_(class_scale)
        head.bias[-1] += bias
        head.bias[:-1].normal_(0.0, 2.0, generator=g)
    for emb in (pred.query_feat, pred.query_embed):
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=g))
    mf = model.sem_seg_head.pixel_decoder.mask_features
    mf.weight.sub_(mf.weight.mean(dim=0, keepdim=True))
    for mlp in (pred.mask_embed, model.tracker.mask_embed, model.refiner.mask_embed):
        last = mlp.layers[-1]
        last.weight.sub_(last.weight.mean(dim=0, keepdim=True))
    pos_last = model.tracker.pos_embed.layers[-1]
    pos_last.weight.mul_(pos_scale)
    pos_last.bias.zero_()
    for layer in model.tracker.transformer_cross_attention_layers:
        attn = layer.multihead_attn
        c = attn.embed_dim
        attn.in_proj_weight[: 2 * c].mul_(qk_scale)
    return model


#: Named :func:`spread_weights_` settings (keyword overrides of its defaults).
#:
#: ``"spread"``: the defaults (tuned on the tiny config; the parity tests and the shared
#: ``r50_test.pth`` use them). At R50 widths they let the tracker validate nearly every
#: new-instance query and keep every live track valid, so the live tracks ``tQ`` grow by ~65 a
#: frame without end (64x96 scene: 93 at frame 1, 3,068 at 40) -- fine for a 12-frame parity
#: clip, useless for anything measured against video length.
#:
#: ``"sparse-tracks"``: R50 widths on small frames (the 64x96 synthetic scene, ``MIN_SIZE_TEST``
#: 64), tracks that behave like a trained model's over long videos: a few births a frame, tracks
#: that stop being valid are kicked out after 8 misses, ``tQ`` bounded (eager, seed 0, 100
#: frames: 50 at frame 0, then 2-20 with short bursts up to 137 that die out within ~16
#: frames; 274 tracks born, 269 killed, longest 22 frames). A larger "no object" bias on the
#: tracker than the defaults' +8 (+13: tracks rarely survive, tQ often 0; +11: tQ climbs to
#: ~550) and +13 on the segmenter and refiner (fewer frame-0 births, refiner top-K not a tie).
#: Used by ``benchmarks/memory_auto.py --make-r50-bundle``. Frame size matters: the same biases
#: give other counts on larger frames (the 360p R50 demo uses +13 / +15, ``cli_demo.SPREAD``).
TEST_WEIGHT_PRESETS = {
    "spread": {},
    "sparse-tracks": {"no_object_bias": 13.0, "tracker_no_object_bias": 12.0},
}


def build_test_model(cfg, seed: int = 0, spread: bool = True, preset: str = "spread"):
    """A seeded random ``DvisDaqOffline`` for ``cfg`` (eval mode), spread unless told not to.

    ``preset`` names the :func:`spread_weights_` settings (:data:`TEST_WEIGHT_PRESETS`;
    default ``"spread"``, the defaults). Raises ValueError for an unknown preset."""
    from .model.build import build_model

    if preset not in TEST_WEIGHT_PRESETS:
        raise ValueError(f"unknown test-weight preset {preset!r}; "
                         f"known: {', '.join(sorted(TEST_WEIGHT_PRESETS))}")
    torch.manual_seed(seed)
    model = build_model(cfg)
    if spread:
        spread_weights_(model, seed=seed, **TEST_WEIGHT_PRESETS[preset])
    return model.eval()
