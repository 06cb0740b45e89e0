"""Eager PyTorch backend: the five stages of :mod:`dvis_trt.export.stages` (the baseline).

The only runtime module that imports torch, and only when instantiated. It runs the stage
modules of a :class:`~dvis_trt.export.model.dvis_daq.DvisDaqOffline` (MSDeformAttn in its
eager reference mode) on numpy inputs and returns numpy outputs, so a pipeline written against
:class:`~dvis_trt.runtime.backends.base.Backend` runs unchanged on it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dvis_trt.errors import BundleError, DependencyError, InputError
from .base import Backend, check_inputs

__all__ = ["TorchBackend"]


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise DependencyError("the torch backend needs PyTorch: pip install 'dvis-trt[export]'"
                              ) from exc
    return torch


class TorchBackend(Backend):
    """Eager PyTorch stages.

    Args:
        model: a ``DvisDaqOffline`` with weights loaded; or None to build one at the first
            :meth:`load_stage` from ``config_file`` (default: the manifest's ``config.source``)
            and ``checkpoint``.
        checkpoint: checkpoint file (official layout) for the model built here.
        config_file: config YAML to build the model from (default: the manifest's
            ``config.source``, with the manifest's ``producer.config_overrides``).
        overrides: ``KEY=VALUE`` config overrides for ``config_file``.
        device: torch device (``"cpu"`` default; ``"cuda"`` where available).
        threads: ``torch.set_num_threads`` value, if given.
        allow_unsafe_pickle: see :func:`dvis_trt.export.checkpoint.load_state_dict_file`.
        autocast: ``"fp16"`` runs the stages under ``torch.autocast(float16)`` on CUDA (float16
            outputs are returned as float32); ``None`` (default) runs them in fp32.
        compile: wrap each stage module in ``torch.compile(dynamic=True)``.
    """

    name = "torch"

    def __init__(self, model: Any = None, *, checkpoint: Optional[Union[str, os.PathLike]] = None,
                 config_file: Optional[Union[str, os.PathLike]] = None,
                 overrides: Optional[Sequence[str]] = None, device: str = "cpu",
                 threads: Optional[int] = None, allow_unsafe_pickle: bool = False,
                 autocast: Optional[str] = None, compile: bool = False):
        torch = _torch()
        if autocast not in (None, "fp16"):
            raise InputError(f"autocast must be None or 'fp16', got {autocast!r}")
        self._autocast = autocast
        self._compile = bool(compile)
        self.threads = None if threads is None else int(threads)
        self.device = torch.device(device)
        if threads is not None:
            torch.set_num_threads(int(threads))
        self._model = model
        self._checkpoint = checkpoint
        self._config_file = config_file
        self._overrides = None if overrides is None else list(overrides)
        self._allow_unsafe_pickle = allow_unsafe_pickle
        self._modules: Optional[Dict[str, Any]] = None
        self._specs: Dict[str, Any] = {}

    # -- model -----------------------------------------------------------------------------
    def _ensure_model(self, manifest) -> None:
        if self._modules is not None:
            return
        from dvis_trt.export.stages import build_stages

        if self._model is None:
            from dvis_trt.export.named_configs import eager_config_source, load_named_config
            from dvis_trt.runtime.provenance import recorded_checkpoint

            if self._checkpoint is None:  # the one the bundle records (sha256 checked)
                self._checkpoint = recorded_checkpoint(manifest, needed_for="the torch backend")
            if self._config_file is not None:
                source, overrides = os.fspath(self._config_file), self._overrides
            else:
                source, recorded = eager_config_source(manifest)
                overrides = self._overrides if self._overrides is not None else recorded
                if not source or not os.path.isfile(source):
                    raise InputError(f"config file {source!r} (from the bundle manifest) is not "
                                     "readable; pass --config")
            from dvis_trt.export.checkpoint import load_checkpoint
            from dvis_trt.export.model.build import build_model

            model = build_model(load_named_config(source, overrides or None))
            load_checkpoint(model, self._checkpoint, strict=True, config_name=str(source),
                            allow_unsafe_pickle=self._allow_unsafe_pickle)
            self._model = model
        self._model.to(self.device).eval()
        dims = manifest.config.dims
        q = self._model.sem_seg_head.predictor.query_feat.weight.shape
        if (int(q[0]), int(q[1])) != (dims["Q"], dims["C"]):
            raise BundleError(f"the eager model has {tuple(q)} queries x hidden, the bundle "
                              f"{dims['Q']} x {dims['C']}: model and bundle come from different "
                              "configs")
        modules = build_stages(self._model)
        if self._compile:
            torch = _torch()
            modules = {k: torch.compile(v, dynamic=True) for k, v in modules.items()}
        self._modules = modules

    def load_stage(self, stage_name: str, manifest) -> None:
        """Prepare ``stage_name`` (builds / loads the eager model on the first call)."""
        spec = manifest.stage(stage_name)
        self._ensure_model(manifest)
        self._specs[stage_name] = spec

    @property
    def loaded_stages(self) -> Tuple[str, ...]:
        return tuple(self._specs)

    # -- running ---------------------------------------------------------------------------
    def run(self, stage_name: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one eager stage on host arrays (see :meth:`Backend.run`)."""
        spec = self._specs.get(stage_name)
        if spec is None or self._modules is None:
            raise BundleError(f"stage '{stage_name}' is not loaded in the torch backend; call "
                              "load_stage first")
        check_inputs(spec, inputs)
        torch = _torch()
        from dvis_trt.export.model.msda import msda_mode

        names = [t.name for t in spec.inputs]
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in names]
        amp = (torch.autocast("cuda", dtype=torch.float16) if self._autocast == "fp16"
               else contextlib.nullcontext())
        with amp, torch.no_grad(), msda_mode("eager"):
            try:
                out = self._modules[stage_name](*args)
            except ValueError as exc:
                raise InputError(f"stage '{stage_name}' (torch): {exc}") from exc
        if not isinstance(out, (tuple, list)):
            out = (out,)
        result = {t.name: o.detach().cpu().numpy() for t, o in zip(spec.outputs, out)}
        if self._autocast:
            result = {k: (v.astype(np.float32) if v.dtype == np.float16 else v)
                      for k, v in result.items()}
        return result

    def close(self) -> None:
        self._specs.clear()
        self._modules = None
