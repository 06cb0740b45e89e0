"""INT8 post-training quantization of a bundle: explicit Q/DQ graphs from calibration frames.

``dvis-trt export --precision int8 --calibration VIDEO`` and ``dvis-trt quantize BUNDLE
--calibration VIDEO --output NEW`` both end here: the fp32 segmenter graph is calibrated on
frames of the user's video(s) and rewritten with explicit ``QuantizeLinear`` /
``DequantizeLinear`` pairs (QDQ format). One graph serves both runtimes:

* ONNX Runtime (CPU) fuses ``DQ -> Conv/MatMul -> Q`` into its int8 kernels
  (``QLinearConv``, ``MatMulIntegerToFloat``; VNNI dot products on AVX-512 machines);
* TensorRT 10/11 parses the same Q/DQ nodes as *explicit quantization* (a strongly typed
  network: the precision of every layer is what the graph says; no calibrator and no INT8
  builder flag is involved). For that the graph follows TensorRT's Q/DQ rules: int8, symmetric
  (zero point 0) everywhere, per-output-channel scales for weights (axis 0 of a Conv weight,
  axis 1 of a MatMul ``B``), one scale per activation tensor, biases left in float.

What is quantized: every ``Conv`` / ``MatMul`` / ``Gemm`` whose weight is a constant
(activation x weight: the backbone, the pixel decoder's convolutions and deformable-encoder
projections, the decoder's q/k/v/out projections and FFNs), **except** the numerically
sensitive ones, which stay fp32 (see :data:`SENSITIVE_PATTERNS` and
:func:`dvis_trt.export.precision.kept_fp32_nodes`): MSDeformAttn sampling offsets and
attention weights (and the sampling itself, a custom node or GridSample, never quantized),
attention logits and softmax, LayerNorm, the class heads, the mask-embedding MLP and the
mask products (``mask_embed x mask_features``) whose sigmoid is thresholded at 0.5 to build
the attention masks and the pooled mask features. Products of two activations
(attention ``Q K^T``, ``attn V``) are never quantized. Only the ``segmenter`` stage is
quantized (80-90 % of a clip's time); the tracker, refiner and mask head stay fp32: their
inputs exist only inside a pipeline run, and together they cost a tenth of the segmenter.

Tool: ONNX Runtime's static quantizer (``onnxruntime.quantization.quantize_static``, QDQ
format), chosen over NVIDIA ModelOpt's ONNX PTQ on measurements in ``docs/benchmarks.md``
(section "INT8"). ``tool="modelopt"`` is kept as an option for TensorRT-only deployments.

Calibration frames are decoded from the given videos / frame folders, spread evenly over each
video (first to last frame), and preprocessed exactly as the pipeline does (Pillow resize of
the shortest edge, normalise, zero-pad) — one frame per calibration sample, at the video's
inference size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dvis_trt.errors import DependencyError, InputError

__all__ = ["QUANT_TOOLS", "QUANTIZED_STAGES", "SENSITIVE_PATTERNS", "QuantReport",
           "CalibrationSet", "load_calibration", "select_nodes", "quantize_model",
           "msda_sessions", "DEFAULT_CALIBRATION_FRAMES", "quantize_bundle", "corrupt_scale"]

QUANT_TOOLS = ("ort", "modelopt")
#: Stages that get Q/DQ (the rest is copied fp32).
QUANTIZED_STAGES = ("segmenter",)
DEFAULT_CALIBRATION_FRAMES = 32
_QUANT_OPS = ("Conv", "MatMul", "Gemm")
#: Node-name patterns (``re.search``) kept fp32 on top of the fp16 rules of
#: :func:`~dvis_trt.export.precision.kept_fp32_nodes`, with the reason shown in the report.
SENSITIVE_PATTERNS: Dict[str, str] = {
    r"class_embed": "class-head",
    r"mask_embed": "mask-embedding",
    r"sampling_offsets": "msda-coordinates",
    r"/attention_weights/": "msda-attention-weights",
    r"/predictor/MatMul(_\d+)?$": "mask-product",
    r"pixel_decoder/mask_features/": "mask-features",
    r"^/segmenter/MatMul(_\d+)?$": "mask-pooling",
}


@dataclasses.dataclass
class CalibrationSet:
    """Preprocessed calibration samples and where they came from.

    ``samples``: list of float32 (1, 3, Hp, Wp) segmenter inputs. ``provenance``: JSON-able
    dict (videos with path, size, frame count and the indices drawn, sha256 of the samples).
    """

    samples: List[np.ndarray]
    provenance: Dict[str, Any]


@dataclasses.dataclass
class QuantReport:
    """What :func:`quantize_model` did: tool, nodes quantized, nodes kept fp32 with a reason."""

    tool: str
    quantized: List[str]
    kept: Dict[str, str]
    num_qdq: int = 0
    #: the ONNX external-data file written next to the graph (large graphs), or None
    data_file: Optional[str] = None

    def summary(self) -> str:
        from collections import Counter  # noqa: PLC0415
        by = Counter(self.kept.values())
        rules = ", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none"
        return (f"int8 via {self.tool}: {len(self.quantized)} Conv/MatMul quantized "
                f"({self.num_qdq} Q/DQ nodes), {len(self.kept)} kept fp32 ({rules})")

    def to_dict(self) -> Dict[str, Any]:
        from collections import Counter  # noqa: PLC0415
        return {"tool": self.tool, "quantized": len(self.quantized), "qdq_nodes": self.num_qdq,
                "kept_fp32": dict(Counter(self.kept.values()))}


def _onnx():
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        raise DependencyError("int8 quantization needs the 'onnx' package; "
                              "pip install 'dvis-trt[export]'") from None
    return onnx


# ---------------------------------------------------------------------------------------------
# calibration frames
# ---------------------------------------------------------------------------------------------
def _spread(n_total: int, n_pick: int) -> List[int]:
    """``n_pick`` indices spread evenly over ``0..n_total-1``, first and last included."""
    if n_total <= 0 or n_pick <= 0:
        return []
    if n_pick >= n_total:
        return list(range(n_total))
    if n_pick == 1:
        return [n_total // 2]
    return sorted({int(round(i * (n_total - 1) / (n_pick - 1))) for i in range(n_pick)})


def load_calibration(paths: Sequence[os.PathLike | str], values: Mapping[str, Any],
                     num_frames: int = DEFAULT_CALIBRATION_FRAMES) -> CalibrationSet:
    """Decode and preprocess ``num_frames`` calibration frames from ``paths``.

    Args:
        paths: video files, frame folders or folders of frame folders (as ``dvis-trt run``).
        values: the bundle's config values (``manifest.config.to_dict()``): ``min_size_test``,
            ``max_size_test``, ``pixel_mean``, ``pixel_std``, ``size_divisibility``,
            ``input_format``.
        num_frames: frames in total, shared evenly by the videos (at least one per video);
            within a video they are spread from its first to its last frame.
    Returns:
        :class:`CalibrationSet` (one float32 (1, 3, Hp, Wp) array per frame).
    Raises:
        InputError: no path, an unreadable or empty video, ``num_frames`` < 1.
    """
    from dvis_trt.runtime.preprocess import (normalize_and_pad, resize_frame,  # noqa: PLC0415
                                             resize_shortest_edge_shape)
    from dvis_trt.runtime.inputs import discover_inputs  # noqa: PLC0415

    if int(num_frames) < 1:
        raise InputError(f"--calibration-frames must be >= 1, got {num_frames}")
    if not paths:
        raise InputError("int8 needs calibration frames: pass --calibration VIDEO_OR_FOLDER")
    for p in paths:
        if not Path(p).exists():
            raise InputError(f"calibration input {p} does not exist")
    jobs, _ = discover_inputs([Path(p) for p in paths])
    per_video = max(1, math.ceil(int(num_frames) / len(jobs)))
    samples: List[np.ndarray] = []
    videos = []
    digest = hashlib.sha256()
    for job in jobs:
        frames = [f.rgb for f in job.open().iter_frames()]
        if not frames:
            raise InputError(f"calibration video {job.path} has no frames")
        picks = _spread(len(frames), per_video)
        h, w = frames[0].shape[:2]
        nh, nw = resize_shortest_edge_shape(h, w, int(values["min_size_test"]),
                                            int(values["max_size_test"]))
        for i in picks:
            img = normalize_and_pad([resize_frame(np.ascontiguousarray(frames[i]), nh, nw)],
                                    values["pixel_mean"], values["pixel_std"],
                                    int(values.get("size_divisibility", 32)),
                                    input_format=str(values.get("input_format", "RGB")))
            digest.update(img.tobytes())
            samples.append(img)
        videos.append({"path": str(Path(job.path).absolute()) if job.path else job.name,
                       "frames": len(frames), "size": [int(h), int(w)],
                       "indices": [int(i) for i in picks]})
        del frames
    prov = {"videos": videos, "num_samples": len(samples),
            "preprocessing": "pipeline (Pillow shortest-edge resize, normalise, zero-pad)",
            "samples_sha256": digest.hexdigest()}
    return CalibrationSet(samples, prov)


# ---------------------------------------------------------------------------------------------
# which nodes
# ---------------------------------------------------------------------------------------------
def select_nodes(model, extra_exclude: Sequence[str] = (),
                 force: Sequence[str] = ()) -> Tuple[List[str], Dict[str, str]]:
    """Split the weighted ``Conv``/``MatMul``/``Gemm`` nodes of ``model`` (an
    ``onnx.ModelProto`` whose nodes are named) into (to quantize, kept fp32 -> reason).

    A node is a candidate when its weight input (input 1) is an initializer or a ``Constant``
    output. It is kept fp32 when :func:`~dvis_trt.export.precision.kept_fp32_nodes` keeps it
    (attention logits, MSDA coordinates, ...), when its name matches
    :data:`SENSITIVE_PATTERNS` or one of ``extra_exclude`` (regular expressions), unless it
    matches one of ``force`` (regular expressions; for experiments and tests).
    """
    from dvis_trt.export.precision import kept_fp32_nodes  # noqa: PLC0415

    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    rules = kept_fp32_nodes(model)
    pats = [(re.compile(p), why) for p, why in SENSITIVE_PATTERNS.items()]
    pats += [(re.compile(p), "user") for p in extra_exclude]
    quant: List[str] = []
    kept: Dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type not in _QUANT_OPS:
            continue
        if len(n.input) < 2 or n.input[1] not in consts:
            continue  # activation x activation: never quantized
        why = next((w for p, w in pats if p.search(n.name)), None) or rules.get(n.name)
        if why and not any(re.search(f, n.name) for f in force):
            kept[n.name] = why
        else:
            quant.append(n.name)
    return quant, kept


# ---------------------------------------------------------------------------------------------
# sessions that can run our MSDA node (calibration runs the graph in ONNX Runtime)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """ORT's quantizer logs advice on the root logger ("Please consider to run pre-processing
    before quantization"), which would reach the user's terminal as Python warnings; our
    graphs are exported shape-inferred already. Root level raised to ERROR meanwhile."""
    import logging  # noqa: PLC0415

    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)


@contextlib.contextmanager
def msda_sessions(model_has_plugin: bool) -> Iterator[None]:
    """While active, every ``onnxruntime.InferenceSession`` created (by the quantizer's
    calibrator) registers the MSDA CPU twin, so ``--msda plugin`` graphs can be calibrated.
    A no-op for graphs without the node."""
    if not model_has_plugin:
        yield
        return
    import onnxruntime as ort  # noqa: PLC0415

    from dvis_trt.plugins.ort_op import session_options  # noqa: PLC0415
    original = ort.InferenceSession.__init__

    def init(self, path_or_bytes, sess_options=None, *args, **kwargs):
        so = session_options(sess_options if sess_options is not None else ort.SessionOptions())
        original(self, path_or_bytes, so, *args, **kwargs)

    ort.InferenceSession.__init__ = init
    try:
        yield
    finally:
        ort.InferenceSession.__init__ = original


def _has_plugin(model) -> bool:
    from dvis_trt.export.precision import MSDA_OP_TYPES  # noqa: PLC0415
    return any(n.op_type in MSDA_OP_TYPES for n in model.graph.node)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds, with the
    ``__len__`` / ``set_range`` that ORT's strided calibration uses (one frame at a time)."""

    def __init__(self, name: str, samples: Sequence[np.ndarray]):
        self._feeds = [{name: s} for s in samples]
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self):
        return next(self._it, None)

    def get_first(self):  # ModelOpt peeks at the first feed
        return self._feeds[0] if self._feeds else None

    def rewind(self) -> None:
        self._it = iter(self._feeds)


#: Tensors per calibration pass of a large graph (see :func:`chunked_minmax_ranges`). ViT-L's
#: segmenter has ~700 of them, 20-30 MB each at 480x864.
CALIBRATION_CHUNK = 128


def chunked_minmax_ranges(src: str, input_name: str, samples, plugin: bool, workdir: str,
                          chunk: int = CALIBRATION_CHUNK, external_data: bool = False):
    """The activation ranges ONNX Runtime's MinMax calibration would compute for ``src``,
    computed ``chunk`` tensors at a time.

    ORT's calibrator adds a ReduceMin/ReduceMax pair to every input and output of the Conv /
    MatMul / Gemm nodes and runs the whole graph once per frame; the reductions run late, so
    every calibrated tensor of a frame stays alive at once (ViT-L's segmenter at 480x864: RSS
    past 18-23 GB on the first frame). Here each pass augments only ``chunk`` of those tensors
    (ORT's own :class:`~onnxruntime.quantization.calibrate.MinMaxCalibrater`, restricted), runs
    every sample, and the per-tensor (min, max) are merged: the same ranges (min of mins, max
    of maxes), with at most ``chunk`` extra tensors alive. Costs one pass over the samples per
    chunk. Returns ORT's ``TensorsData`` (MinMax) for ``quantize_static``'s calibration cache.
    Follows ``onnxruntime.quantization.quantize.quantize_static`` + ``calibrate.py``."""
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415
    from onnxruntime.quantization.calibrate import (CalibrationMethod,  # noqa: PLC0415
                                                    MinMaxCalibrater, TensorsData)

    reader_cls = type("_CalibReader", (_Reader, CalibrationDataReader), {})
    probe = MinMaxCalibrater(src, op_types_to_calibrate=list(_QUANT_OPS),
                             augmented_model_path=os.path.join(workdir, "probe.onnx"),
                             use_external_data_format=external_data)
    names, _ = probe.select_tensors_to_calibrate(probe.model)
    names = sorted(names)
    del probe
    merged: Dict[str, Any] = {}
    for start in range(0, len(names), max(int(chunk), 1)):
        part = set(names[start:start + max(int(chunk), 1)])

        class _Part(MinMaxCalibrater):
            def select_tensors_to_calibrate(self, model, _part=part):
                found, infos = super().select_tensors_to_calibrate(model)
                return found & _part, infos

        cal = _Part(src, op_types_to_calibrate=list(_QUANT_OPS),
                    augmented_model_path=os.path.join(workdir, f"augmented_{start}.onnx"),
                    use_external_data_format=external_data)
        cal.augment_graph()
        with msda_sessions(plugin):
            cal.create_inference_session()
        reader = reader_cls(input_name, samples)
        for i in range(len(reader)):            # one frame at a time (ORT's strided mode)
            reader.set_range(start_index=i, end_index=i + 1)
            cal.collect_data(reader)
        got = cal.compute_data()
        for k in part:
            merged[k] = got[k]
        del cal
        for f in os.listdir(workdir):
            if f.startswith(f"augmented_{start}."):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(workdir, f))
    return TensorsData(CalibrationMethod.MinMax, merged)


def _quantize_ort(src: str, dst: str, input_name: str, samples, nodes: List[str],
                  plugin: bool, reduce_range: bool = False,
                  external_data: bool = False, chunk: Optional[int] = None) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,  # noqa: PLC0415
                                          QuantFormat, QuantType, quantize_static)

    reader_cls = type("_CalibReader", (_Reader, CalibrationDataReader), {})
    cache = None
    if chunk:  # ranges computed chunk by chunk, handed over as ORT's calibration cache
        from onnxruntime.quantization.quantize import save_tensors_data  # noqa: PLC0415
        workdir = os.path.dirname(dst)
        ranges = chunked_minmax_ranges(src, input_name, samples, plugin, workdir, chunk,
                                       external_data)
        cache = os.path.join(workdir, "calibration_cache.json")
        save_tensors_data(ranges, cache)
    with msda_sessions(plugin), _quiet_ort_logging():
        quantize_static(
            src, dst, reader_cls(input_name, samples), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(_QUANT_OPS), per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=external_data,
            extra_options={
                # TensorRT's explicit-quantization rules: symmetric int8, zero point 0
                "ActivationSymmetric": True, "WeightSymmetric": True,
                # biases stay float (TensorRT has no int32 dequantize; ORT folds them anyway)
                "QuantizeBias": False,
                # one Q/DQ pair per quantized consumer: ORT fuses a DQ into a consumer's int8
                # kernel only when it feeds that node alone (e.g. a block input read by conv1
                # and the shortcut). ORT's common-subexpression elimination would merge the
                # pairs again, so the ORT backend disables it for int8 bundles
                # (ort_backend.INT8_DISABLED_OPTIMIZERS); fp32 readers: unshare_dq
                "DedicatedQDQPair": True,
                # MatMul outputs stay float: DQ -> MatMul (-> Add bias) fuses into
                # MatMulIntegerToFloat, no requantization of the output
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
                # per-output-channel MatMul weights (B is (in, out): axis 1)
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                # reduce the ranges after every frame: memory bounded by one frame's
                # activations on full-size models
                "CalibStridedMinMax": 1,
            },
            calibration_cache_path=cache)


def _quantize_modelopt(src: str, dst: str, input_name: str, samples, kept: Dict[str, str],
                       plugin: bool) -> None:
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        raise DependencyError(f"--quant-tool modelopt needs NVIDIA ModelOpt ({exc}); pip install "
                              "nvidia-modelopt onnx-graphsurgeon onnxslim lief") from None
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415
    reader_cls = type("_CalibReader", (_Reader, CalibrationDataReader), {})
    # ModelOpt writes intermediate models (and their external data) into the working
    # directory; run it from the temporary folder so nothing is left beside the user's files
    cwd = os.getcwd()
    os.chdir(os.path.dirname(os.path.abspath(dst)))
    with msda_sessions(plugin), contextlib.ExitStack() as stack:
        stack.callback(os.chdir, cwd)
        mo_quantize(src, quantize_mode="int8", calibration_data_reader=reader_cls(input_name,
                                                                                 samples),
                    calibration_method="max", calibration_eps=["cpu"],
                    nodes_to_exclude=[f"^{re.escape(n)}$" for n in sorted(kept)],
                    op_types_to_exclude=["Softmax", "LayerNormalization"],
                    high_precision_dtype="fp32", output_path=dst, log_level="ERROR")


def unshare_dq(model, quantized: Sequence[str]) -> int:
    """Feed the fp32 consumers of a quantized activation the fp32 tensor itself.

    ORT's quantizer hands the ``DequantizeLinear`` output of a quantized tensor to *every*
    consumer, e.g. a ResNet block output to the next block's ``conv1`` / shortcut (quantized)
    and to its residual ``Add`` (fp32). ONNX Runtime fuses ``DQ -> Conv/MatMul -> Q`` into an
    int8 kernel only when the DQ feeds that node unit alone (and merges duplicated DQ nodes
    again), so such convolutions stayed fp32: measured, 26 of the R50 segmenter's 59 (every
    block's conv1, the shortcuts, the pixel decoder's projections). Rewiring the fp32
    consumers to the tensor before the ``QuantizeLinear`` fixes that, and keeps the residual
    sums exact; TensorRT accepts either placement. Returns the number of inputs rewired.
    Modifies ``model`` in place."""
    import collections  # noqa: PLC0415
    quantized = set(quantized)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for k, x in enumerate(n.input):
            if x:
                consumers[x].append((n, k))
    inits = {i.name for i in model.graph.initializer}
    rewired = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = producer.get(n.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        users = consumers.get(n.output[0], [])
        if not any(u.name in quantized for u, _ in users):
            continue  # e.g. a Conv's output Q/DQ before its Relu: ORT's fusion needs that Q
        for user, k in users:
            if user.name not in quantized:
                user.input[k] = q.input[0]
                rewired += 1
    return rewired


def quantize_model(src: os.PathLike | str, dst: os.PathLike | str, samples: Sequence[np.ndarray],
                   *, tool: str = "ort", extra_exclude: Sequence[str] = (),
                   force: Sequence[str] = (), reduce_range: bool = False,
                   calibration_chunk: Optional[int] = None) -> QuantReport:
    """Calibrate ``src`` (an fp32 stage graph with one float input) on ``samples`` and write the
    Q/DQ graph to ``dst`` (may equal ``src``; written via a temporary file).

    ``reduce_range``: 7-bit weights ([-64, 64], still symmetric int8 with zero point 0, so
    TensorRT accepts the graph) for CPUs without VNNI: their int8 kernels (AVX2 / AVX-512
    ``vpmaddubsw``) add pairs of u8 x s8 products in int16, which saturates with full-range
    weights (ONNX Runtime's quantization guide recommends it there). Measured on the tiny test
    weights on an AVX2 machine: mean mask IoU against fp32 0.68 -> 0.89. ``tool="ort"`` only.

    ``calibration_chunk``: calibrate that many tensors per pass over the samples
    (:func:`chunked_minmax_ranges`; same ranges, bounded memory); None: one pass for all,
    except for graphs large enough for external data (ViT-L), which use
    :data:`CALIBRATION_CHUNK`. ``tool="ort"`` only.

    Raises InputError for an unknown tool or no samples (or ``reduce_range`` with ModelOpt),
    DependencyError when the tool is missing.
    """
    onnx = _onnx()
    if tool not in QUANT_TOOLS:
        raise InputError(f"unknown quantization tool {tool!r}; use {', '.join(QUANT_TOOLS)}")
    if not samples:
        raise InputError("no calibration samples")
    if reduce_range and tool != "ort":
        raise InputError("--reduce-range needs --quant-tool ort (ModelOpt has no such option)")
    try:
        import onnxruntime.quantization  # noqa: F401, PLC0415
    except ImportError as exc:
        raise DependencyError(f"int8 quantization needs onnxruntime.quantization ({exc}); "
                              "pip install onnxruntime") from None
    from dvis_trt.export.precision import ensure_node_names, topological_sort  # noqa: PLC0415

    model = onnx.load(str(src))
    ensure_node_names(model)
    quant, kept = select_nodes(model, extra_exclude, force)
    if not quant:
        raise InputError(f"{src}: no Conv/MatMul with constant weights to quantize")
    plugin = _has_plugin(model)
    input_name = model.graph.input[0].name
    from dvis_trt.export.onnx_io import EXTERNAL_DATA_THRESHOLD, save_graph  # noqa: PLC0415

    dst = Path(dst)
    # a large graph (ViT-L's segmenter, ~1.4 GB) is handed to the quantizer, and written back,
    # with ONNX external data, like the exporter writes it (protobuf stops at 2 GiB)
    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(prefix="dvis_int8_", dir=dst.parent) as tmp:
        named = os.path.join(tmp, "named.onnx")
        save_graph(model, named)
        del model
        out = os.path.join(tmp, "int8.onnx")
        if tool == "ort":
            chunk = calibration_chunk or (CALIBRATION_CHUNK if large else None)
            _quantize_ort(named, out, input_name, samples, quant, plugin, reduce_range,
                          external_data=large, chunk=chunk)
        else:
            _quantize_modelopt(named, out, input_name, samples, kept, plugin)
        qmodel = onnx.load(out)
        unshare_dq(qmodel, quant)
        topological_sort(qmodel.graph)
        num_qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                      for n in qmodel.graph.node)
        os.mkdir(os.path.join(tmp, "final"))
        final = os.path.join(tmp, "final", dst.name)  # the data file's name follows the graph's
        data_file = save_graph(qmodel, final)
        del qmodel
        if data_file:
            os.replace(os.path.join(tmp, "final", data_file), dst.parent / data_file)
        else:  # a source's external data that the quantized graph no longer uses
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst.parent / (dst.name + ".data"))
        os.replace(final, dst)
    return QuantReport(tool, quant, kept, num_qdq, data_file)


def corrupt_scale(path: os.PathLike | str, node_pattern: str, factor: float = 50.0) -> int:
    """Test helper: multiply the weight scales of the quantized nodes matching ``node_pattern``
    by ``factor`` in place (a deliberately broken quantization). Returns how many scales were
    changed."""
    onnx = _onnx()
    from onnx import numpy_helper  # noqa: PLC0415
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    pat = re.compile(node_pattern)
    changed = 0
    for n in model.graph.node:
        if n.op_type not in _QUANT_OPS or not pat.search(n.name) or len(n.input) < 2:
            continue
        dq = producers.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            continue
        init = inits[dq.input[1]]
        arr = numpy_helper.to_array(init) * np.float32(factor)
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
        changed += 1
    onnx.save(model, str(path))
    return changed


# ---------------------------------------------------------------------------------------------
# a whole bundle
# ---------------------------------------------------------------------------------------------
def quantize_bundle(bundle: os.PathLike | str, output: os.PathLike | str,
                    calibration: Sequence[os.PathLike | str], *,
                    num_frames: int = DEFAULT_CALIBRATION_FRAMES, tool: str = "ort",
                    validation: Optional[Sequence[os.PathLike | str]] = None,
                    report: bool = True, threads: Optional[int] = None,
                    exclude: Sequence[str] = (), force: Sequence[str] = (),
                    reduce_range: bool = False,
                    progress: Optional[Callable[[str], None]] = None):
    """Write an int8 copy of the fp32 ``bundle`` to ``output`` (the source is not modified).

    The segmenter is calibrated on ``num_frames`` frames of ``calibration`` and quantized
    (:func:`quantize_model`); the other stages and the constants are copied. The manifest says
    ``precision: int8`` and records the calibration (videos, frame indices, preprocessing,
    sha256 of the samples), the tool and what was kept fp32 (``producer.quantization``). With
    ``report``, the accuracy report against ``bundle`` on ``validation`` (default: the
    calibration videos) is written to ``output/accuracy.json``
    (:mod:`dvis_trt.runtime.accuracy`) and its verdict printed. ``exclude``: more node-name
    regular expressions to keep fp32 (like ModelOpt's ``--nodes_to_exclude``);
    ``reduce_range``: 7-bit weights (:func:`quantize_model`).

    Returns ``(manifest, report_or_None)``. Raises InputError (not an fp32 bundle, a
    ``trt-builtin`` bundle, a bad output folder, no calibration frames), BundleError,
    DependencyError.
    """
    import shutil  # noqa: PLC0415
    import time  # noqa: PLC0415

    from dvis_trt.runtime.bundle import load_manifest, write_manifest  # noqa: PLC0415

    say = progress or (lambda line: None)
    src_manifest = load_manifest(bundle)
    src = Path(src_manifest.root)
    dest = Path(output).absolute()
    if src_manifest.precision != "fp32":
        raise InputError(f"{src} is a {src_manifest.precision} bundle; quantize the fp32 bundle "
                         "(dvis-trt export --precision fp32)")
    if src_manifest.msda == "trt-builtin":
        raise InputError(f"{src} was exported with --msda trt-builtin, which ONNX Runtime cannot "
                         "run for calibration; export with --msda plugin (the same graph for "
                         "TensorRT, calibrated through the CPU twin)")
    from dvis_trt.outputs import (check_outputs, commit_folder, owned_entries,  # noqa: PLC0415
                                  temp_path, write_marker)
    check_outputs([("--output", dest)],
                  [("bundle", src)] + [("--calibration", p) for p in calibration]
                  + [("--validation", p) for p in (validation or ())], folders=("--output",))
    owned = owned_entries(dest, extra_owned=("engines",))  # refuses a folder not ours
    t0 = time.perf_counter()
    cal = load_calibration(list(calibration), src_manifest.config.to_dict(), num_frames)
    say(f"calibration: {cal.provenance['num_samples']} frames from "
        f"{len(cal.provenance['videos'])} video(s) in {time.perf_counter() - t0:.1f} s")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest, keep_suffix=False)
    tmp.mkdir()
    try:
        files = [f for s in src_manifest.stages.values() for f in (s.file, s.data_file) if f]
        if src_manifest.constants is not None:
            files.append(src_manifest.constants.file)
        for f in files:
            shutil.copy2(src / f, tmp / f)
        reports = {}
        stages = dict(src_manifest.stages)
        for stage in QUANTIZED_STAGES:
            if stage not in src_manifest.stages:
                continue
            t1 = time.perf_counter()
            path = tmp / src_manifest.stages[stage].file
            rep = quantize_model(path, path, cal.samples, tool=tool, extra_exclude=exclude,
                                 force=force, reduce_range=reduce_range)
            reports[stage] = rep.to_dict()
            stages[stage] = dataclasses.replace(stages[stage], data_file=rep.data_file,
                                                data_sha256=None)
            say(f"{stage}: {rep.summary()} in {time.perf_counter() - t1:.1f} s")
        producer = dict(src_manifest.producer)
        producer["calibration"] = cal.provenance
        producer["quantization"] = {"stages": reports, "from_bundle": str(src),
                                    "exclude": list(exclude), "reduce_range": bool(reduce_range),
                                    "scheme": "QDQ int8 symmetric, per-channel weights, "
                                              "MinMax-calibrated per-tensor activations"}
        import onnxruntime  # noqa: PLC0415
        producer["onnxruntime"] = onnxruntime.__version__
        manifest = dataclasses.replace(src_manifest, precision="int8", producer=producer,
                                       stages=stages, root=None)
        write_manifest(tmp, manifest, hash_files=True)
        acc = None
        if report:
            from dvis_trt.runtime.accuracy import (REPORT_FILE, compare_bundles,  # noqa: PLC0415
                                                   write_report)
            videos = list(validation or calibration)
            acc = compare_bundles(tmp, src, videos, threads=threads, progress=say)
            acc.info["validation"] = "calibration video(s)" if not validation else \
                "separate validation video(s)"
            acc.info["candidate"]["bundle"] = str(dest)  # not the temporary folder it ran in
            write_report(acc, tmp / REPORT_FILE)
            say(f"accuracy vs {src.name} ({acc.info['validation']}): {acc.verdict()}")
        write_marker(tmp, os.listdir(tmp))
        commit_folder(tmp, dest, owned)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = load_manifest(dest, verify=False)
    say(f"int8 bundle written to {dest} in {time.perf_counter() - t0:.1f} s")
    return written, acc
