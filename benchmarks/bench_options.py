"""What ``dvis-trt bench`` is asked to do (:class:`BenchOptions`) and the eager baseline model
it compares every backend with (:func:`build_eager_model`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from dvis_trt.errors import InputError

from dvis_trt.runtime.bundle import load_constants

from .parity import FP32_PARITY

@dataclass
class BenchOptions:
    """What :func:`run_bench` does. Paths are strings or Paths. See ``dvis-trt bench -h``."""

    bundles: Sequence[Any]
    video: Any
    backends: Sequence[str] = ("torch", "ort")
    checkpoint: Optional[Any] = None
    test_weights: Optional[int] = None
    no_baseline: bool = False
    config_file: Optional[Any] = None
    overrides: Sequence[str] = ()
    threads: Optional[int] = None
    affinity: bool = False
    max_frames: Optional[int] = None
    window: int = 5
    warmup: int = 1
    repeats: int = 3
    stage_iters: int = 10
    stage_budget: float = 30.0
    stages: bool = True
    flops: bool = True
    gemm_seconds: float = 2.0
    gemm_sizes: Sequence[int] = (1024, 2048)
    memory: str = "inprocess"
    parity_iou: float = FP32_PARITY["iou_min"]
    parity_score_atol: float = FP32_PARITY["score_atol"]
    profile_ops: bool = False
    profile_stage: str = "segmenter"
    sweep: bool = False
    sweep_frames: Sequence[int] = (12, 48, 192)
    sweep_sizes: Sequence[int] = (360, 480, 720)
    sweep_backends: Optional[Sequence[str]] = None
    sweep_repeats: int = 1
    label: Optional[str] = None
    argv: Optional[Sequence[str]] = None
    log: Callable[[str], None] = print


def build_eager_model(manifest, opts: BenchOptions):
    """The eager baseline model for a bundle: ``--checkpoint`` (strict load) or
    ``--test-weights SEED`` (``export.testing.build_test_model``), config from ``--config-file``
    or the manifest's ``config.source`` + recorded overrides. The model's host constants must
    equal the bundle's (else the two come from different weights). Returns None when neither
    weights option is given and the manifest records no checkpoint."""
    from dvis_trt.export.named_configs import eager_config_source, load_named_config
    from dvis_trt.runtime.provenance import recorded_checkpoint
    ckpt = opts.checkpoint
    if ckpt is None and opts.test_weights is None:
        ckpt = recorded_checkpoint(manifest)  # None if absent; refused if the file changed
    if ckpt is None and opts.test_weights is None:
        return None
    if opts.config_file is not None:
        source, overrides = os.fspath(opts.config_file), list(opts.overrides or [])
    else:
        source, recorded = eager_config_source(manifest)
        overrides = list(opts.overrides or []) or recorded
        if not source or not Path(source).is_file():
            raise InputError(f"config file {source!r} (from the bundle manifest) is not "
                             "readable; pass --config")
    cfg = load_named_config(source, overrides or None)
    if ckpt is not None:
        from dvis_trt.export.checkpoint import load_checkpoint
        from dvis_trt.export.model.build import build_model
        model = build_model(cfg)
        load_checkpoint(model, ckpt, strict=True, config_name=str(source))
    else:
        from dvis_trt.export.testing import build_test_model
        model = build_test_model(cfg, seed=int(opts.test_weights))
    model.eval()
    consts = load_constants(manifest)
    mine = {"bg_slots": model.tracker.bg_slots.weight,
            "seg_query_feat": model.sem_seg_head.predictor.query_feat.weight}
    for k, v in mine.items():
        if k in consts and (consts[k].shape != tuple(v.shape) or
                            not np.allclose(consts[k], v.detach().float().numpy(), atol=1e-6)):
            raise InputError(f"the eager model's {k} differs from bundle {manifest.root}'s: "
                             "checkpoint / --test-weights and bundle come from different "
                             "weights; pass the checkpoint the bundle was exported from")
    return model


def _row_key(backend: str, msda: str, multi: bool, precision: str = "fp32",
             tag: str = "") -> str:
    """A row's name: ``backend``, or with several bundles ``backend[msda=M(,precision)(,tag)]``
    (precision when not fp32; ``tag``, the bundle's folder name, when another bundle of the
    run has the same MSDA mode and precision, e.g. two int8 variants)."""
    if not multi or backend == "torch":
        return backend
    parts = [f"msda={msda}"] + ([precision] if precision != "fp32" else []) + \
        ([tag] if tag else [])
    return f"{backend}[{','.join(parts)}]"


def bundle_tags(manifests) -> Dict[str, str]:
    """``{str(manifest.root): tag}`` for :func:`_row_key`: the folder name of every bundle that
    shares its (MSDA mode, precision) with another one of the run, "" for the rest.

    Raises InputError when two such bundles also share their folder name (their rows would
    still collide)."""
    from collections import defaultdict

    groups = defaultdict(list)
    for man in manifests:
        groups[(man.msda, man.precision)].append(man)
    tags: Dict[str, str] = {}
    for (msda, precision), mans in groups.items():
        names = [Path(str(m.root)).name for m in mans]
        for i, m in enumerate(mans):
            if len(mans) > 1 and names.count(names[i]) > 1:
                other = next(o for j, o in enumerate(mans) if j != i and names[j] == names[i])
                raise InputError(f"bundles {other.root} and {m.root} are both msda={msda} "
                                 f"{precision} in folders of the same name: bench tells such "
                                 "bundles apart by their folder names; rename one, or bench "
                                 "them in separate runs (--compare joins the reports)")
            tags[str(m.root)] = names[i] if len(mans) > 1 else ""
    return tags
