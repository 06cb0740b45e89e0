"""The small interface every inference backend implements (ONNX Runtime, TensorRT, torch).

A backend runs the five stages of a bundle (``segmenter``, ``tracker_first``, ``tracker_step``,
``refiner``, ``mask_head``; tensor names, dtypes and symbolic shapes as in DESIGN.md's table and
:data:`dvis_trt.runtime.bundle.STAGE_SPECS`). The pipeline talks to it in two ways:

* **Host API** (every backend): :meth:`Backend.run` takes and returns ``numpy`` arrays keyed by
  the stage's tensor names. Simple, and what the ORT and torch backends do natively.
* **Resident API** (every backend; only the TensorRT backend makes it *fast*):
  :meth:`Backend.run_resident` takes inputs that are either numpy arrays or *tensor handles*
  returned by an earlier ``run_resident`` call, and returns handles for every output. Only the
  outputs named in ``fetch`` are also copied to the host (for TensorRT: through pinned memory,
  on the backend's one CUDA stream). :meth:`Backend.to_host` turns any handle into a numpy array.
  The default implementation here makes a handle *be* a numpy array, so a pipeline written
  against the resident API runs unchanged on a host-only backend; the TensorRT backend's
  handles are device buffers (``DeviceTensor``) that feed the next stage without a copy
  (segmenter ``mask_features`` -> ``tracker_step`` / ``mask_head``, ``frame_embeds`` ->
  ``refiner``).

Rules for implementers:

* ``load_stage`` may be called again for a stage already loaded: it is a no-op.
* ``run`` / ``run_resident`` raise :class:`~dvis_trt.errors.BundleError` for a stage
  that was not loaded, and :class:`~dvis_trt.errors.InputError` (one line: stage,
  tensor, expected vs got) for a missing/unexpected input name, a wrong dtype or a wrong rank
  — :func:`check_inputs` does exactly that and backends should call it before running.
* Outputs are returned for *every* output name of the stage, with the manifest's dtypes.
* Returned numpy arrays are owned by the caller (a backend must not overwrite them on the next
  call). Handles returned by ``run_resident`` stay valid until the *same stage* runs again
  with the same shape bucket, or until :meth:`Backend.release` is called on them; callers
  that need a value longer must ``to_host`` it (or, for TRT, ``copy`` the handle).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Collection, Iterable, Mapping

import numpy as np

from dvis_trt.errors import BundleError, InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..bundle import BundleManifest, StageSpec

__all__ = ["Backend", "TensorLike", "check_inputs", "dtype_of"]

#: What ``run_resident`` accepts and returns: a numpy array, or a backend-specific handle
#: exposing at least ``.shape`` (tuple of int) and ``.dtype`` (numpy dtype).
TensorLike = Any


def dtype_of(name: str) -> np.dtype:
    """Numpy dtype for a manifest dtype string (``"float32"``, ``"float16"``, ``"int64"``,
    ``"int32"``, ``"bfloat16"``; bfloat16 needs ``ml_dtypes``).

    Raises :class:`BundleError` for a dtype string the runtime does not know.
    """
    if name == "bfloat16":
        try:
            import ml_dtypes  # noqa: PLC0415
        except ImportError:  # pragma: no cover - ml_dtypes ships with onnx
            raise BundleError("a stage tensor is bfloat16 but the 'ml_dtypes' package is "
                              "missing; pip install ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:
        raise BundleError(f"unknown tensor dtype {name!r} in the bundle manifest; "
                          "re-export the bundle with this dvis-trt version") from None


def check_inputs(stage: "StageSpec", inputs: Mapping[str, TensorLike]) -> None:
    """Check names, dtypes and ranks of ``inputs`` against a stage's manifest I/O spec.

    ``stage`` is a :class:`dvis_trt.runtime.bundle.StageSpec` (``.name``, ``.inputs`` with
    ``.name`` / ``.dtype`` / ``.shape``). Fixed (integer) dims of the spec are checked too;
    symbolic dims are checked for consistency *within* the call (the same symbol must have one
    value across all inputs, e.g. ``T`` of ``images`` and nothing else, ``tQ`` shared by
    ``track_queries`` and ``track_pos``) — symbols in derived expressions (``tQ+S``) are not.

    Raises :class:`InputError` with one line naming the stage, the tensor and what was expected.
    """
    expected = {t.name: t for t in stage.inputs}
    missing = [n for n in expected if n not in inputs]
    extra = [n for n in inputs if n not in expected]
    if missing or extra:
        raise InputError(
            f"stage '{stage.name}': inputs {sorted(inputs)} do not match the bundle's "
            f"{sorted(expected)} (missing {missing}, unexpected {extra}); "
            "pass exactly the stage's input names")
    bound: dict[str, tuple[int, str]] = {}
    for name, spec in expected.items():
        value = inputs[name]
        shape = tuple(int(d) for d in value.shape)
        want_dtype = dtype_of(spec.dtype)
        if np.dtype(value.dtype) != want_dtype:
            raise InputError(f"stage '{stage.name}' input '{name}': dtype {np.dtype(value.dtype)}"
                             f", expected {want_dtype}; cast it before running")
        if len(shape) != len(spec.shape):
            raise InputError(f"stage '{stage.name}' input '{name}': shape {shape} has rank "
                             f"{len(shape)}, expected {len(spec.shape)} {tuple(spec.shape)}")
        for axis, (got, want) in enumerate(zip(shape, spec.shape)):
            if isinstance(want, int):
                if got != want:
                    raise InputError(
                        f"stage '{stage.name}' input '{name}': dim {axis} is {got}, expected "
                        f"{want} (shape {tuple(spec.shape)}); the bundle was exported for "
                        "another config")
            elif isinstance(want, str) and want.isidentifier():
                prev = bound.get(want)
                if prev is not None and prev[0] != got:
                    raise InputError(
                        f"stage '{stage.name}': symbol {want} is {prev[0]} in '{prev[1]}' but "
                        f"{got} in '{name}' (dim {axis}); make these inputs agree")
                bound[want] = (got, name)


class Backend:
    """Base class of inference backends. Subclasses set :attr:`name` and implement
    :meth:`load_stage` and :meth:`run`; the resident API has a host-array default.

    Typical use (the pipeline)::

        backend = SomeBackend(...)
        for stage in manifest.stages:
            backend.load_stage(stage, manifest)
        out = backend.run("segmenter", {"images": images})       # dict of numpy arrays
        backend.close()

    Backends are context managers (``with SomeBackend() as b: ...`` closes them).
    """

    #: Short backend name used on the command line and in reports (``"ort"``, ``"trt"``, ...).
    name: ClassVar[str] = "base"
    #: True when ``run_resident`` keeps outputs off the host (TensorRT). Pipelines may use it
    #: to decide whether to prefer the resident API; correctness never depends on it.
    device_resident: ClassVar[bool] = False
    #: One line for logs, set by :func:`~dvis_trt.runtime.backends.registry.create_backend`.
    description: str = ""

    # -- host API -------------------------------------------------------------------------
    def load_stage(self, stage_name: str, manifest: "BundleManifest") -> None:
        """Prepare ``stage_name`` of the bundle described by ``manifest`` for running.

        ``manifest`` is a loaded, validated :class:`~dvis_trt.runtime.bundle.BundleManifest`
        (``manifest.root`` is the bundle folder, ``manifest.stages[stage_name]`` the I/O spec,
        ``manifest.stage_path(stage_name)`` the ONNX file). Raises :class:`BundleError` when the
        stage is not in the bundle or its artefact (ONNX, engine, plugin) cannot be loaded.
        """
        raise NotImplementedError

    def run(self, stage_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one stage synchronously on host arrays.

        ``inputs``: every input name of the stage -> numpy array (dtype and rank as the manifest
        says). Returns every output name -> a new numpy array owned by the caller.
        Raises :class:`InputError` for bad inputs, :class:`BundleError` for an unloaded stage.
        """
        raise NotImplementedError

    @property
    def loaded_stages(self) -> tuple[str, ...]:
        """Names of the stages loaded so far (subclasses override; default: none known)."""
        return ()

    def load_all(self, manifest: "BundleManifest",
                 stages: Iterable[str] | None = None) -> None:
        """``load_stage`` for each of ``stages`` (default: every stage in the manifest)."""
        for stage in (manifest.stages if stages is None else stages):
            self.load_stage(stage, manifest)

    # -- resident API -----------------------------------------------------------------------
    def run_resident(self, stage_name: str, inputs: Mapping[str, TensorLike],
                     fetch: Collection[str] = ()) -> dict[str, TensorLike]:
        """Run one stage, keeping outputs where the backend computes them.

        ``inputs``: numpy arrays or handles from earlier ``run_resident`` calls *of this
        backend*. Returns a handle per output; outputs named in ``fetch`` are numpy arrays
        already on the host. Default (host backends): handles are numpy arrays.
        """
        del fetch  # every output is on the host already
        return self.run(stage_name, {k: self.to_host(v) for k, v in inputs.items()})

    def to_host(self, value: TensorLike) -> np.ndarray:
        """A numpy copy (or the array itself, for host backends) of a tensor handle."""
        if isinstance(value, np.ndarray):
            return value
        raise TypeError(f"backend '{self.name}' cannot read a {type(value).__name__} "
                        "(a tensor handle from another backend?)")

    def release(self, value: TensorLike) -> None:
        """Tell the backend a handle is no longer needed (default: nothing to do)."""

    def synchronize(self) -> None:
        """Wait for all queued work (default: nothing is ever queued)."""

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Free sessions / engines / device memory. Idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} stages={list(self.loaded_stages)}>"
