"""Host-side post-processing shared by every backend (numpy, scipy, ONNX Runtime; no torch).

- :func:`softmax` / :func:`fg_scores`: class scores as the official code computes them.
- :func:`minvis_link`: the frame-by-frame Hungarian link of the segmenter's queries used to fill
  the refiner's instance queries (official ``DVIS_DAQ_offline.minvis_post_processing`` with
  ``match_from_embds``).
- :func:`select_topk`: top-``MAX_NUM`` over (query, class) pairs (official
  ``inference_video_vis``).
- :class:`MaskUpsampler`: mask logits at 1/4 resolution -> boolean masks at the original frame
  size: bilinear to the padded input size, crop to the resized image, bilinear to the original
  size, ``> 0`` (official ``inference_video_vis``). The two bilinear resizes run as ONNX
  ``Resize`` (linear, ``pytorch_half_pixel``) in ONNX Runtime, which reproduces
  ``F.interpolate(mode="bilinear", align_corners=False)``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .tracking import cosine_cost


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32 (same dtype as the engines' logits)."""
    x = logits.astype(np.float32, copy=False)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def fg_scores(logits: np.ndarray) -> np.ndarray:
    """Max softmax probability over the foreground classes: ``(..., K+1) -> (...)``."""
    return softmax(logits)[..., :-1].max(axis=-1)


def minvis_link(frame_embeds: np.ndarray, pred_logits: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Link the segmenter's queries frame by frame (official ``minvis_post_processing``).

    Frame 0 keeps its query order; each later frame is permuted to match the previous (already
    permuted) frame by the Hungarian assignment on ``1 - cosine`` of the frame embeds
    (``match_from_embds``, norms without epsilon).

    Args:
        frame_embeds: float32 (T, Q, C).
        pred_logits: float32 (T, Q, K+1).
    Returns:
        (mean logits float32 (Q, K+1), linked embeds float32 (T, Q, C)).
    """
    t_len = frame_embeds.shape[0]
    linked_e = np.empty_like(frame_embeds)
    linked_l = np.empty_like(pred_logits)
    linked_e[0], linked_l[0] = frame_embeds[0], pred_logits[0]
    for i in range(1, t_len):
        tgt = linked_e[i - 1]
        cur = frame_embeds[i]
        cost = cosine_cost(cur, tgt, eps=0.0)   # (current, target), norms without epsilon
        idx = linear_sum_assignment(cost.T)[1]  # for each target, the current query
        linked_e[i] = cur[idx]
        linked_l[i] = pred_logits[i][idx]
    mean_logits = linked_l.sum(axis=0, dtype=np.float32) / np.float32(t_len)
    return mean_logits.astype(np.float32), linked_e


def select_topk(pred_logits: np.ndarray, max_num: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``max_num`` (query, class) pairs of the refiner's class logits.

    The official code takes an unsorted ``topk`` over the flattened ``(Qr, K)`` foreground
    scores; we sort descending with a stable sort (ties keep the lower flat index), so one query
    can appear with two labels, exactly as officially.

    Args:
        pred_logits: float32 (Qr, K+1).
        max_num: ``TEST.MAX_NUM``.
    Returns:
        (scores float32 (S,), labels int64 (S,) 0-based, query index int64 (S,)), S = min(max_num, Qr*K).
    """
    scores = softmax(pred_logits)[:, :-1]
    k = scores.shape[1]
    flat = scores.reshape(-1)
    order = np.argsort(-flat, kind="stable")[:max_num]
    return flat[order].astype(np.float32), (order % k).astype(np.int64), (order // k).astype(np.int64)


MASK_UPSAMPLE_GRAPH = "mask_upsample.onnx"  # shipped beside this file: no onnx needed at run time


def _resize_graph_bytes() -> bytes:
    """The mask-upsampling graph, built with ``onnx.helper`` (regenerates the shipped
    ``mask_upsample.onnx``; ``tests/test_postprocess.py`` checks the two are identical)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", "h", "w"])
    padded = helper.make_tensor_value_info("padded_size", TensorProto.INT64, [4])
    crop_end = helper.make_tensor_value_info("crop_end", TensorProto.INT64, [2])
    out_size = helper.make_tensor_value_info("out_size", TensorProto.INT64, [4])
    y = helper.make_tensor_value_info("masks", TensorProto.BOOL, ["N", "T", "H", "W"])
    zero2 = helper.make_tensor("zero2", TensorProto.INT64, [2], [0, 0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    fzero = helper.make_tensor("fzero", TensorProto.FLOAT, [], [0.0])
    nodes = [
        helper.make_node("Resize", ["logits", "", "", "padded_size"], ["up"], mode="linear",
                         coordinate_transformation_mode="pytorch_half_pixel"),
        helper.make_node("Slice", ["up", "zero2", "crop_end", "axes"], ["cropped"]),
        helper.make_node("Resize", ["cropped", "", "", "out_size"], ["final"], mode="linear",
                         coordinate_transformation_mode="pytorch_half_pixel"),
        helper.make_node("Greater", ["final", "fzero"], ["masks"]),
    ]
    graph = helper.make_graph(nodes, "dvis_trt_mask_upsample", [x, padded, crop_end, out_size], [y],
                              initializer=[zero2, axes, fzero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class MaskUpsampler:
    """Mask logits (S, t, h, w) -> bool masks (S, t, H, W) at the original frame size.

    Semantics of the official ``inference_video_vis``: ``F.interpolate`` bilinear
    (``align_corners=False``) to the padded input size ``(Hp, Wp)``, crop to the resized image
    ``(h_img, w_img)``, bilinear to the original ``(H, W)``, ``> 0``. Runs as a 4-node ONNX graph
    in ONNX Runtime (multi-threaded C++ resize), so no torch is needed.
    """

    max_chunk_bytes = 64 << 20

    def __init__(self, intra_op_threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        opts.log_severity_level = 3
        import os

        shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), MASK_UPSAMPLE_GRAPH)
        if os.path.isfile(shipped):
            with open(shipped, "rb") as f:
                graph = f.read()
        else:  # a source tree without the file: build it (needs the onnx package)
            graph = _resize_graph_bytes()
        self._sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    def __call__(self, logits: np.ndarray, padded_size: Tuple[int, int],
                 image_size: Tuple[int, int], out_size: Tuple[int, int]) -> np.ndarray:
        """Args: logits float32 (S, t, h, w); padded_size (Hp, Wp); image_size (h_img, w_img)
        (resized, unpadded); out_size (H, W) original. Returns bool (S, t, H, W)."""
        s, t = logits.shape[:2]
        if s == 0 or t == 0:
            return np.zeros((s, t, *out_size), dtype=bool)
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        # ORT materialises the float32 result before ``> 0``: bound it to ~64 MB per call
        # (4K frames: a few instances at a time), so memory does not grow with the frame size
        per = t * (max(out_size[0], padded_size[0]) * max(out_size[1], padded_size[1])) * 4
        step = max(1, int(self.max_chunk_bytes // max(per, 1)))
        out = np.empty((s, t, *out_size), dtype=bool)
        for a in range(0, s, step):
            b = min(s, a + step)
            feeds = {
                "logits": logits[a:b],
                "padded_size": np.array([b - a, t, padded_size[0], padded_size[1]], np.int64),
                "crop_end": np.array([image_size[0], image_size[1]], dtype=np.int64),
                "out_size": np.array([b - a, t, out_size[0], out_size[1]], dtype=np.int64),
            }
            out[a:b] = self._sess.run(["masks"], feeds)[0]
        return out
