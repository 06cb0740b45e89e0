"""Per-stage ONNX export of DVIS-DAQ offline into a bundle folder.

``export_bundle(model, cfg, out_dir)`` writes::

    out_dir/
      segmenter.onnx tracker_first.onnx tracker_step.onnx refiner.onnx mask_head.onnx
      constants.npz      # bg_slots (S, C) = tracker.bg_slots.weight,
                         # seg_query_feat (Q, C) = sem_seg_head.predictor.query_feat.weight
      manifest.json      # dvis_trt.runtime.bundle schema (format 1)

Each stage graph goes through: the TorchScript exporter (pinned, see :data:`EXPORTER`) with the
dynamic axes of :data:`dvis_trt.runtime.bundle.STAGE_SPECS` -> Polygraphy constant folding
(``polygraphy.backend.onnx.fold_constants``, which folds shape sub-graphs too) -> graph I/O
shapes stamped from the stage spec -> ``onnx.shape_inference`` (strict, type-checked, data
propagation) -> ``onnx.checker.check_model(full_check=True)`` -> our TensorRT-friendliness
checks (:func:`~dvis_trt.export.onnx_checks.check_graph`: no bool graph I/O, no NonZero /
ScatterND / Einsum / control flow, no data-dependent-shape ops, custom MSDA nodes only in the
plugin modes, with their ``plugin_version`` / ``plugin_namespace`` attributes). Any failure
aborts the export.

The bundle is written into a temporary folder next to ``out_dir`` and swapped in at the end
(:func:`~dvis_trt.export.onnx_io.replace_dir`), so a failed or interrupted export never leaves a
half bundle, and a re-export into an existing bundle replaces what it wrote (its marker lists it)
and TensorRT engines built for the old graphs under ``out_dir/engines`` (they no longer match);
files a user put beside the bundle stay, and a folder that is not a bundle of ours is refused
(:mod:`dvis_trt.outputs`).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from torch import nn

import dvis_trt
from dvis_trt.errors import InputError
from dvis_trt.runtime.bundle import (
    EXPORT_STAGE_NAMES, MSDA_MODES, ONLINE_STAGE_NAMES, InferenceConfig, BundleManifest,
    ConstantsSpec, StageSpec, TensorSpec, stage_specs, write_manifest)

from .model import msda as msda_mod
from .sample_inputs import SampleDims, sample_images, sample_stage_inputs
from .stages import build_stages, eager_runner, stage_input_names, stage_output_names
from .onnx_checks import (ExportError, _stamp_io_shapes, _walk_nodes, check_graph,
                          fold_constants)
from .onnx_io import external_data_file, replace_dir, save_graph

__all__ = ["EXPORTER", "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET", "CONSTANTS_FILE", "export_bundle",
           "export_from_checkpoint", "export_stage", "example_dims", "bundle_values", "StageReport"]


log = logging.getLogger(__name__)

#: Exporter per stage, pinned (``torch.onnx.export(..., dynamo=False)``). torch >= 2.9 defaults
#: to the dynamo (``torch.export``) exporter; we use the TorchScript tracer for every stage
#: because (1) the ``plugin`` / ``trt-builtin`` MSDA modes emit their custom node through an
#: ``autograd.Function.symbolic``, which only the TorchScript exporter honours (dynamo would need
#: an onnxscript translation table per op and version); (2) the ``onnx`` MSDA mode slices the
#: flattened value tensor at offsets read from ``level_start_index`` / ``spatial_shapes``, which
#: the tracer records as graph computations, while ``torch.export`` turns them into unbacked
#: data-dependent symbols and guards; (3) the model code is written and tested against the
#: tracer (``torch.jit.is_tracing()`` switches the attention to plain ops so no key length is
#: baked into a Reshape); (4) dynamo exports at opset 18 and down-converts to 17 with the
#: version converter, one more transformation between the tested graph and the shipped one.
#: Passing ``dynamo=False`` explicitly means a torch upgrade cannot silently switch exporter.
EXPORTER: Dict[str, str] = {stage: "torchscript" for stage in EXPORT_STAGE_NAMES}
#: GridSample (the ``onnx`` MSDA mode) needs opset 16; LayerNormalization is a single op from
#: 17 on (TensorRT fuses it). The TorchScript exporter stops at 20.
DEFAULT_OPSET = 17
MIN_OPSET = 16
MAX_OPSET = 20


CONSTANTS_FILE = "constants.npz"
#: Tracer warnings known to be harmless: eager-only input checks and ``F.group_norm``'s
#: training-time batch-size check read shapes into Python bools; they guard nothing in the graph
#: (the parity tests at several input sizes are the proof).
_BENIGN_WARNINGS = ("Converting a tensor to a Python boolean",
                    "legacy TorchScript-based ONNX export",
                    "The feature will be removed")


@dataclasses.dataclass
class StageReport:
    """What :func:`export_stage` did: file, seconds, bytes, node count, op types."""

    stage: str
    file: str
    seconds: float
    bytes: int
    nodes: int
    op_types: Tuple[str, ...]
    data_file: Optional[str] = None   # ONNX external data next to ``file`` (large graphs)


# ---------------------------------------------------------------------------------------------
# config values and example shapes
# ---------------------------------------------------------------------------------------------
def bundle_values(cfg: Any) -> Dict[str, Any]:
    """The manifest ``config`` block: ``inference_values(cfg)`` for a loaded config, or a copy of
    an already-made mapping of those values (must have ``num_classes``)."""
    if isinstance(cfg, Mapping) and "num_classes" in cfg:
        return dict(cfg)
    from dvis_trt.export.config import inference_values
    return inference_values(cfg)


def _round_up(x: int, m: int) -> int:
    return (int(x) + m - 1) // m * m


def example_dims(values: Mapping[str, Any], window: int = 5,
                 size: Optional[Tuple[int, int]] = None) -> SampleDims:
    """Sizes of the inputs the stages are traced with (realistic; every dim distinct from the
    fixed ones where possible so no broadcast is specialised).

    Segmenter: ``window`` frames at ``size`` (padded H, W; default ``min_size_test`` at 16:9,
    e.g. 480 x 864 for the R50 OVIS config). tracker_step: 7 live tracks. refiner: ``2*window+1``
    frames, ``N`` instance queries. mask_head: ``refiner_window_size`` frames, ``max_num``
    queries. Raises InputError for a window < 1 or a bad size.
    """
    if int(window) < 1:
        raise InputError(f"--window must be >= 1 (frames per segmenter call), got {window}")
    div = max(32, int(values.get("size_divisibility", 32)))
    if size is None:
        short = int(values.get("min_size_test", 480))
        size = (_round_up(short, div), _round_up(int(short * 16 / 9 + 0.5), div))
    h, w = (int(size[0]), int(size[1]))
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise InputError(f"example size {h}x{w} must be positive multiples of 32 (padded input)")
    n = int(values["num_new_ins"])
    t = max(1, min(int(values.get("refiner_window_size", 3)), 2 * window + 1))
    return SampleDims(frames=int(window), height=h, width=w, tracks=7,
                      refiner_frames=2 * int(window) + 1, refiner_queries=n, mask_frames=t,
                      mask_queries=max(1, min(int(values.get("max_num", 20)), n)))


# ---------------------------------------------------------------------------------------------
# one stage
# ---------------------------------------------------------------------------------------------
def _dynamic_axes(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> Dict[str, Dict[int, str]]:
    axes = {}
    for t in list(inputs) + list(outputs):
        d = {i: str(s) for i, s in enumerate(t.shape) if isinstance(s, str)}
        if d:
            axes[t.name] = d
    return axes


def export_stage(module: nn.Module, stage: str, example: Mapping[str, np.ndarray],
                 path: Union[str, os.PathLike], *, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], msda: str = "onnx",
                 opset: int = DEFAULT_OPSET, fold: bool = True) -> StageReport:
    """Export one stage module to ``path`` and check it (see the module docstring).

    Args:
        module: a :func:`build_stages` module (eval mode).
        stage: stage name (selects the names / dynamic axes).
        example: stage input name -> numpy array used to trace.
        inputs / outputs: the stage's TensorSpecs with the config's numbers filled in
            (:func:`dvis_trt.runtime.bundle.stage_specs`); string dims become dynamic axes.
        msda: ``onnx`` | ``plugin`` | ``trt-builtin``.
        opset: ONNX opset (``MIN_OPSET``..``MAX_OPSET``).
        fold: run Polygraphy constant folding.
    Returns:
        :class:`StageReport`.
    Raises:
        ExportError: the exporter, checker, shape inference or :func:`check_graph` failed.
    """
    if msda not in MSDA_MODES:
        raise InputError(f"--msda must be one of {', '.join(MSDA_MODES)}, got {msda!r}")
    if EXPORTER[stage] != "torchscript":  # pragma: no cover - pinned above
        raise ExportError(f"stage '{stage}': exporter {EXPORTER[stage]!r} is not supported")
    t0 = time.perf_counter()
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n]))
                 for n in stage_input_names(stage))
    buf = io.BytesIO()
    kwargs: Dict[str, Any] = {}
    if msda in ("plugin", "trt-builtin") and \
            any(isinstance(m, msda_mod.MSDeformAttn) for m in module.modules()):
        kwargs["custom_opsets"] = dict(msda_mod.MSDA_CUSTOM_OPSETS)
    with msda_mod.msda_mode(msda), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                module, args, buf,
                dynamo=False,  # pinned: TorchScript exporter, see EXPORTER
                opset_version=int(opset),
                input_names=list(stage_input_names(stage)),
                output_names=list(stage_output_names(stage)),
                dynamic_axes=_dynamic_axes(inputs, outputs),
                do_constant_folding=True,
                export_params=True,
                keep_initializers_as_inputs=False,
                training=torch.onnx.TrainingMode.EVAL,
                **kwargs)
        except Exception as exc:
            raise ExportError(f"stage '{stage}': torch.onnx.export failed: "
                              f"{str(exc).splitlines()[0][:300]}") from exc
    for w in caught:
        msg = str(w.message)
        level = logging.DEBUG if any(s in msg for s in _BENIGN_WARNINGS) else logging.WARNING
        log.log(level, "stage %s export: %s: %s", stage, w.category.__name__, msg.splitlines()[0])
    model = onnx.load_from_string(buf.getvalue())
    del buf
    if fold:
        model = fold_constants(model)
    _stamp_io_shapes(model, inputs, outputs)
    model.producer_name = "dvis_trt"
    model.producer_version = dvis_trt.__version__
    model.doc_string = (f"dvis-trt stage '{stage}' (DVIS-DAQ offline), msda={msda}, "
                        f"exporter={EXPORTER[stage]} (torch {torch.__version__})")
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                  data_prop=True)
    except Exception as exc:
        raise ExportError(f"stage '{stage}': ONNX shape inference failed: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    check_graph(model, stage, inputs, outputs, msda)
    path = Path(path)
    ops = tuple(sorted({f"{n.domain}::{n.op_type}" if n.domain else n.op_type
                        for n in _walk_nodes(model.graph)}))
    n_nodes = len(model.graph.node)
    data_file = save_graph(model, path)
    del model
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"stage '{stage}': onnx.checker failed: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    size = path.stat().st_size + ((path.parent / data_file).stat().st_size if data_file else 0)
    return StageReport(stage, path.name, time.perf_counter() - t0, size, n_nodes, ops, data_file)


# ---------------------------------------------------------------------------------------------
# whole bundle
# ---------------------------------------------------------------------------------------------
def _producer(opset: int, reports: Mapping[str, StageReport], dims: SampleDims,
              msda: str, overrides: Sequence[str]) -> Dict[str, Any]:
    import onnxruntime  # noqa: PLC0415 - a runtime dependency; version only
    out: Dict[str, Any] = {
        "dvis_trt": dvis_trt.__version__, "torch": torch.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": int(opset),
        "exporter": {s: EXPORTER[s] for s in reports},
        "example_dims": dataclasses.asdict(dims),
        # config.source + these overrides rebuild the eager model (dvis-trt check, torch backend)
        "config_overrides": [str(o) for o in overrides],
    }
    try:
        import polygraphy
        out["polygraphy"] = polygraphy.__version__
    except ImportError:  # pragma: no cover
        pass
    if msda in ("plugin", "trt-builtin"):
        out["msda_node"] = {"domain": msda_mod.PLUGIN_DOMAIN,
                            "op_type": msda_mod.PLUGIN_OP if msda == "plugin"
                            else msda_mod.TRT_BUILTIN_OP,
                            "plugin_version": msda_mod.PLUGIN_VERSION if msda == "plugin"
                            else msda_mod.TRT_BUILTIN_VERSION}
    return out


def export_bundle(model: nn.Module, cfg: Any, out_dir: Union[str, os.PathLike], msda: str = "onnx",
                  opset: int = DEFAULT_OPSET, window: int = 5, *,
                  example_size: Optional[Tuple[int, int]] = None,
                  stages: Optional[Iterable[str]] = None, fold: bool = True, seed: int = 0,
                  config_overrides: Sequence[str] = (), precision: str = "fp32",
                  provenance: Optional[Mapping[str, Any]] = None,
                  progress: Optional[Callable[[str], None]] = None) -> BundleManifest:
    """Export ``model`` (a :class:`DvisDaqOffline` with weights loaded) to the bundle ``out_dir``.

    Args:
        model: the eager model (``build_model(cfg)`` + ``load_checkpoint``); put in eval mode.
        cfg: the loaded config (:func:`dvis_trt.export.config.load_config`) or the mapping of
            :func:`~dvis_trt.export.config.inference_values` (the manifest's ``config``).
        out_dir: bundle folder; created, or replaced as a whole if it is a bundle already.
        msda: MSDeformAttn export mode ``onnx`` (GridSample), ``plugin`` (one
            ``dvis_trt::DvisMSDeformAttn`` node per call) or ``trt-builtin``
            (``MultiscaleDeformableAttnPlugin_TRT``).
        opset: ONNX opset, ``MIN_OPSET``..``MAX_OPSET`` (default 17).
        window: frames of the example segmenter input (``T`` stays dynamic).
        example_size: (Hp, Wp) of the example images (default: ``min_size_test`` at 16:9).
        stages: subset of stages to export (default: all five; the runtime needs all).
        fold: Polygraphy constant folding (default on).
        seed: seed of the random example inputs.
        config_overrides: the ``KEY=VALUE`` overrides ``cfg`` was loaded with, recorded in the
            manifest (``producer.config_overrides``) so ``config.source`` + overrides rebuild
            the same eager model.
        provenance: extra ``producer`` entries, e.g. ``checkpoint`` / ``config`` records
            (:mod:`dvis_trt.runtime.provenance`; :func:`export_from_checkpoint` fills them).
        progress: called with one line per finished step (e.g. ``print``).
    Returns:
        the written :class:`BundleManifest` (``root`` = ``out_dir``).
    Raises:
        InputError: bad msda / opset / window / output folder; ExportError: a stage failed its
        checks; DependencyError: Polygraphy / onnx-graphsurgeon missing.
    """
    if msda not in MSDA_MODES:
        raise InputError(f"--msda must be one of {', '.join(MSDA_MODES)}, got {msda!r}")
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise InputError(f"--opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
                         f"(GridSample needs 16; the TorchScript exporter stops at {MAX_OPSET})")
    say = progress or (lambda line: log.info("%s", line))
    if precision not in ("fp32", "fp16", "bf16"):
        raise InputError(f"--precision {precision!r}: use fp32, fp16 or bf16 here (int8: "
                         "dvis_trt.export.quantize.quantize_bundle on the fp32 bundle)")
    values = bundle_values(cfg)
    config = InferenceConfig.from_dict(values)
    offline = isinstance(getattr(model, "refiner", None), nn.Module)
    known = EXPORT_STAGE_NAMES if offline else ONLINE_STAGE_NAMES
    wanted = tuple(known if stages is None else stages)
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise InputError(f"unknown stage(s) {unknown}; stages are {', '.join(known)}")
    dest = Path(out_dir).absolute()
    from dvis_trt.outputs import clean_stale_temps, owned_entries, temp_path, write_marker
    owned_entries(dest, extra_owned=("engines",))   # refuses a file / a folder not ours
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest.parent)                     # folders of killed exports

    model.eval()
    mods = build_stages(model)
    dims = example_dims(values, window, example_size)
    specs = stage_specs(**config.dims)
    arrays = {
        "bg_slots": model.tracker.bg_slots.weight.detach().cpu().float().numpy(),
        "seg_query_feat": model.sem_seg_head.predictor.query_feat.weight.detach().cpu()
        .float().numpy(),
    }
    t0 = time.perf_counter()
    # The chain that makes realistic inputs for the later stages runs the eager segmenter on
    # at most 2 frames (minutes saved on a full-size model); the segmenter itself is traced
    # with ``window`` frames.
    chain = dataclasses.replace(dims, frames=min(dims.frames, 2))
    with msda_mod.msda_mode("eager"):
        examples = sample_stage_inputs(eager_runner(mods), chain, arrays,
                                       num_new_ins=config.num_new_ins, seed=seed,
                                       offline=offline)
    if chain.frames != dims.frames:
        examples["segmenter"] = {"images": sample_images(dims.frames, dims.height, dims.width,
                                                         np.random.default_rng(seed))}
    say(f"example inputs ({dims.frames}x3x{dims.height}x{dims.width} images, tQ={dims.tracks}, "
        f"L={dims.refiner_frames}) in {time.perf_counter() - t0:.1f} s")

    tmp = temp_path(dest, keep_suffix=False)
    tmp.mkdir()
    try:
        reports: Dict[str, StageReport] = {}
        entries: Dict[str, StageSpec] = {}
        for stage in wanted:
            ins, outs = specs[stage]
            rep = export_stage(mods[stage], stage, examples[stage], tmp / f"{stage}.onnx",
                               inputs=ins, outputs=outs, msda=msda, opset=opset, fold=fold)
            if precision != "fp32":
                # strongly typed engines run what the graph says: cast with a well-kept
                # converter, LayerNorm/Softmax/reductions/attention logits/MSDA coordinates
                # kept in fp32 (dvis_trt.export.precision); graph I/O stays float32
                from dvis_trt.export.precision import convert_file
                convert_file(tmp / f"{stage}.onnx", tmp / f"{stage}.onnx", precision)
                say(f"{stage}: converted to {precision}")
                if rep.data_file:  # the converted graph may fit in one file now
                    still = external_data_file(tmp / rep.file)
                    if still != rep.data_file and (tmp / rep.data_file).exists():
                        (tmp / rep.data_file).unlink()
                    rep = dataclasses.replace(rep, data_file=still)
            reports[stage] = rep
            entries[stage] = StageSpec(stage, rep.file, "0" * 64, tuple(ins), tuple(outs),
                                       data_file=rep.data_file,
                                       data_sha256="0" * 64 if rep.data_file else None)
            say(f"{stage}: {rep.bytes / 1e6:.1f} MB"
                + (f" (weights in {rep.data_file})" if rep.data_file else "")
                + f", {rep.nodes} nodes, {rep.seconds:.1f} s")
        with open(tmp / CONSTANTS_FILE, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        manifest = BundleManifest(
            config=config, stages=entries, msda=msda, precision=precision,
            producer={**_producer(opset, reports, dims, msda, config_overrides),
                      **dict(provenance or {})},
            constants=ConstantsSpec(CONSTANTS_FILE, "0" * 64,
                                    {k: tuple(int(x) for x in v.shape) for k, v in arrays.items()}))
        write_manifest(tmp, manifest, hash_files=True)
        write_marker(tmp, os.listdir(tmp))             # the entries a re-export may replace
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from dvis_trt.runtime.bundle import load_manifest
    written = load_manifest(dest, verify=False, require_stages=wanted)
    say(f"bundle written to {dest} ({len(wanted)} stages, msda={msda}, opset {opset}) in "
        f"{time.perf_counter() - t0:.1f} s")
    return written


def export_from_checkpoint(config_file: Union[str, os.PathLike],
                           checkpoint: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                           *, msda: str = "onnx", opset: int = DEFAULT_OPSET, window: int = 5,
                           overrides: Optional[Sequence[str]] = None,
                           example_size: Optional[Tuple[int, int]] = None,
                           allow_unsafe_pickle: bool = False, seed: int = 0,
                           precision: str = "fp32",
                           progress: Optional[Callable[[str], None]] = None) -> BundleManifest:
    """Load the config and the checkpoint (strictly) and :func:`export_bundle` the model.

    ``config_file`` is a packaged config name (``"r50-ovis"``, see ``dvis-trt configs``) or a
    YAML path. The manifest records the provenance (:mod:`dvis_trt.runtime.provenance`): the
    checkpoint's absolute path, sha256 and size, and the config's name and path.

    Raises:
        InputError: bad config / options; CheckpointError: keys or shapes that do not match the
        config (listed); ExportError / DependencyError as :func:`export_bundle`.
    """
    from dvis_trt.export.config import load_config

    from .checkpoint import load_checkpoint
    from .model.build import build_model

    from dvis_trt.runtime.provenance import checkpoint_record, config_record

    from .named_configs import resolve_config

    config_path, named = resolve_config(config_file)
    from dvis_trt.outputs import check_outputs
    check_outputs([("--output", out_dir)], [("--checkpoint", checkpoint),
                                            ("--config", config_path)],
                  folders=("--output",))
    cfg = load_config(config_path, overrides)
    if cfg.MODEL.META_ARCHITECTURE == "DVIS_DAQ_online":  # an official online checkpoint
        from .model.build import build_online_model
        model = build_online_model(cfg)
    else:
        model = build_model(cfg)
    load_checkpoint(model, checkpoint, strict=True,
                    config_name=named.name if named else os.fspath(config_file),
                    allow_unsafe_pickle=allow_unsafe_pickle)
    provenance = {"checkpoint": checkpoint_record(checkpoint),
                  "config": config_record(named.name if named else None, config_path)}
    return export_bundle(model, cfg, out_dir, msda=msda, opset=opset, window=window,
                         precision=precision,
                         example_size=example_size, seed=seed,
                         config_overrides=list(overrides or ()), provenance=provenance,
                         progress=progress)
