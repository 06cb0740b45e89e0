"""The bundle manifest (``manifest.json``): :class:`BundleManifest`, loading with
validation, atomic writing.

No torch here: the runtime, the engine builder and the exporter all import this module.

A bundle is a folder::

    bundle/
      manifest.json          # this module's schema (format_version 1, docs/architecture.md)
      segmenter.onnx  tracker_first.onnx  tracker_step.onnx  refiner.onnx  mask_head.onnx
      constants.npz          # bg_slots, seg_query_feat, ... (host-side constants)
      engines/<gpu>-sm<cc>-trt<ver>-<precision>/   # written by `dvis-trt build` (engine/)
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from dvis_trt.errors import BundleError
from dvis_trt.fileio import atomic_write_text, sha256_file

from .config import InferenceConfig
from .stages import MSDA_MODES, PRECISIONS, STAGE_NAMES, STAGE_SPECS, StageSpec, TensorSpec, stage_specs

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "ConstantsSpec", "BundleManifest",
           "manifest_from_dict", "load_manifest", "write_manifest", "load_constants",
           "REQUIRED_CONSTANTS"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ConstantsSpec:
    """Host-side constant arrays (``constants.npz``): file, checksum, name -> shape."""

    file: str
    sha256: str
    arrays: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256,
                "arrays": {k: list(v) for k, v in self.arrays.items()}}


@dataclass(frozen=True)
class BundleManifest:
    """A parsed ``manifest.json``. ``root`` (not serialised) is the folder it was read from."""

    config: InferenceConfig
    stages: dict[str, StageSpec]
    msda: str = "onnx"
    precision: str = "fp32"
    producer: dict = field(default_factory=dict)
    constants: ConstantsSpec | None = None
    format_version: int = FORMAT_VERSION
    root: Path | None = field(default=None, compare=False)

    def stage(self, name: str) -> StageSpec:
        """The spec of ``name``; raises :class:`BundleError` if the bundle lacks it."""
        try:
            return self.stages[name]
        except KeyError:
            raise BundleError(f"bundle {self.root or ''} has no stage '{name}' (it has "
                              f"{', '.join(self.stages) or 'none'}); re-export it") from None

    def stage_path(self, name: str) -> Path:
        """Absolute path of a stage's ONNX file (needs ``root``)."""
        if self.root is None:
            raise BundleError("this manifest was not loaded from a folder; use load_manifest()")
        return self.root / self.stage(name).file

    @property
    def dims(self) -> dict[str, int]:
        """Fixed dims ``Q, C, D, K, N, S`` from the config."""
        return self.config.dims

    def to_dict(self) -> dict:
        d = {"format_version": self.format_version, "producer": dict(self.producer),
             "config": self.config.to_dict(), "msda": self.msda, "precision": self.precision,
             "stages": {k: v.to_dict() for k, v in self.stages.items()}}
        if self.constants is not None:
            d["constants"] = self.constants.to_dict()
        return d


def _safe_rel(file: Any, where: str) -> str:
    if not isinstance(file, str) or not file:
        raise BundleError(f"{where}: 'file' must be a file name, got {file!r}; "
                          "re-export the bundle")
    p = Path(file)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(f"{where}: file {file!r} points outside the bundle; file names must "
                          "be relative to the bundle folder")
    return file


def manifest_from_dict(d: Any, root: Path | None = None) -> BundleManifest:
    """Parse and validate a manifest dict (no file checks; see :func:`load_manifest`).

    Checks: format version, msda mode, precision, config fields and types, each stage's entry,
    and that each stage's input/output names are the canonical ones of :data:`STAGE_SPECS`
    with the right ranks, and integer dims equal to the config's. Raises :class:`BundleError`.
    """
    where = str(root / MANIFEST_NAME) if root is not None else MANIFEST_NAME
    if not isinstance(d, Mapping):
        raise BundleError(f"{where} is not a JSON object; re-export the bundle")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) \
                and version > FORMAT_VERSION:
            raise BundleError(f"{where} has format_version {version}, newer than this "
                              f"dvis-trt reads ({FORMAT_VERSION}); upgrade dvis-trt")
        raise BundleError(f"{where} has format_version {version!r}, this dvis-trt reads "
                          f"{FORMAT_VERSION}; re-export the bundle with `dvis-trt export`")
    msda = d.get("msda", "onnx")
    if msda not in MSDA_MODES:
        raise BundleError(f"{where}: msda {msda!r} is not one of {', '.join(MSDA_MODES)}")
    precision = d.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise BundleError(f"{where}: precision {precision!r} is not one of "
                          f"{', '.join(PRECISIONS)}")
    config = InferenceConfig.from_dict(d.get("config"))
    stages_d = d.get("stages")
    if not isinstance(stages_d, Mapping) or not stages_d:
        raise BundleError(f"{where} lists no stages; re-export the bundle")
    canonical = stage_specs(**{k: v for k, v in config.dims.items()})
    stages: dict[str, StageSpec] = {}
    for name, sd in stages_d.items():
        sw = f"{where} stage '{name}'"
        if name not in STAGE_SPECS:
            raise BundleError(f"{sw}: unknown stage (known: {', '.join(STAGE_NAMES)})")
        if not isinstance(sd, Mapping):
            raise BundleError(f"{sw} is not an object; re-export the bundle")
        file = _safe_rel(sd.get("file"), sw)
        sha = sd.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise BundleError(f"{sw}: sha256 {sha!r} is not a hex sha256; re-export the bundle")
        ins = tuple(TensorSpec.from_dict(t, sw) for t in sd.get("inputs") or ())
        outs = tuple(TensorSpec.from_dict(t, sw) for t in sd.get("outputs") or ())
        for kind, got, want in (("inputs", ins, canonical[name][0]),
                                ("outputs", outs, canonical[name][1])):
            got_names = sorted(t.name for t in got)
            want_names = sorted(t.name for t in want)
            if got_names != want_names:
                raise BundleError(f"{sw}: {kind} {got_names} are not the expected "
                                  f"{want_names}; re-export the bundle with this dvis-trt")
            wmap = {t.name: t for t in want}
            for t in got:
                w = wmap[t.name]
                if len(t.shape) != len(w.shape):
                    raise BundleError(f"{sw}: '{t.name}' has rank {len(t.shape)} "
                                      f"{list(t.shape)}, expected {list(w.shape)}")
                for axis, (a, b) in enumerate(zip(t.shape, w.shape)):
                    if isinstance(a, int) and isinstance(b, int) and a != b:
                        raise BundleError(
                            f"{sw}: '{t.name}' dim {axis} is {a} but the config says {b} "
                            f"(shape {list(w.shape)}); the manifest and its config disagree")
        data_file = data_sha = None
        xd = sd.get("external_data")
        if xd is not None:
            if not isinstance(xd, Mapping):
                raise BundleError(f"{sw}: 'external_data' is not an object; re-export the bundle")
            data_file = _safe_rel(xd.get("file"), f"{sw} external data")
            data_sha = xd.get("sha256")
            if not isinstance(data_sha, str) or len(data_sha) != 64:
                raise BundleError(f"{sw}: external data sha256 {data_sha!r} is not a hex sha256; "
                                  "re-export the bundle")
        stages[name] = StageSpec(name, file, sha, ins, outs, data_file, data_sha)
    constants = None
    cd = d.get("constants")
    if cd is not None:
        cw = f"{where} constants"
        if not isinstance(cd, Mapping):
            raise BundleError(f"{cw} is not an object; re-export the bundle")
        file = _safe_rel(cd.get("file"), cw)
        sha = cd.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise BundleError(f"{cw}: sha256 {sha!r} is not a hex sha256; re-export the bundle")
        arrays = {}
        for k, v in (cd.get("arrays") or {}).items():
            if not isinstance(v, list) or not all(isinstance(x, int) for x in v):
                raise BundleError(f"{cw}: array '{k}' has a bad shape {v!r}")
            arrays[str(k)] = tuple(v)
        constants = ConstantsSpec(file, sha, arrays)
    producer = d.get("producer") or {}
    if not isinstance(producer, Mapping):
        raise BundleError(f"{where}: 'producer' is not an object")
    return BundleManifest(config=config, stages=stages, msda=msda, precision=precision,
                          producer=dict(producer), constants=constants,
                          format_version=FORMAT_VERSION, root=root)


def load_manifest(bundle_dir: str | os.PathLike, *, verify: bool = True,
                  require_stages: Iterable[str] | None = STAGE_NAMES) -> BundleManifest:
    """Read and validate ``bundle_dir/manifest.json``.

    ``verify``: check every stage file and the constants file exist and match their sha256
    (reads them all; hashing a few hundred MB takes about a second). ``require_stages``: stages
    that must be present (default: all five; ``None``/``()`` accepts a partial bundle).
    Returns a :class:`BundleManifest` with ``root`` set to the bundle folder.
    Raises :class:`BundleError` with one line naming the file and what to do.
    """
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; export one with "
                          "`dvis-trt export`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a dvis-trt bundle; export "
                          "one with `dvis-trt export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} cannot be read as JSON ({exc}); re-export the bundle") \
            from None
    manifest = manifest_from_dict(data, root)
    missing = [s for s in (require_stages or ()) if s not in manifest.stages]
    if missing:
        raise BundleError(f"{path} lacks stage(s) {', '.join(missing)}; re-export the "
                          "complete bundle")
    if verify:
        entries = [(f"stage '{n}'", s.file, s.sha256) for n, s in manifest.stages.items()]
        entries += [(f"stage '{n}' external data", s.data_file, s.data_sha256)
                    for n, s in manifest.stages.items() if s.data_file]
        if manifest.constants is not None:
            entries.append(("constants", manifest.constants.file, manifest.constants.sha256))
        for what, file, sha in entries:
            fp = root / file
            if not fp.is_file():
                raise BundleError(f"{fp} ({what}) is missing from the bundle; copy the whole "
                                  "bundle folder or re-export it")
            got = sha256_file(fp)
            if got != sha:
                raise BundleError(f"{fp} ({what}) does not match its sha256 in the manifest "
                                  f"(got {got[:12]}…, expected {sha[:12]}…): it was modified "
                                  "or partly copied; re-export the bundle")
    return manifest


def write_manifest(bundle_dir: str | os.PathLike, manifest: BundleManifest, *,
                   hash_files: bool = True) -> BundleManifest:
    """Write ``bundle_dir/manifest.json`` atomically (temp file + fsync + rename).

    ``hash_files``: recompute every stage's and the constants' sha256 from the files in
    ``bundle_dir`` (they must exist) — what the exporter wants after writing the ONNX files.
    The manifest is validated (:func:`manifest_from_dict`) before anything is written.
    Returns the manifest as written, with ``root`` set. Raises :class:`BundleError`.
    """
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; create it first")
    if hash_files:
        stages = {}
        for n, s in manifest.stages.items():
            fp = root / _safe_rel(s.file, f"stage '{n}'")
            if not fp.is_file():
                raise BundleError(f"{fp} (stage '{n}') does not exist; write the stage file "
                                  "before the manifest")
            stages[n] = dataclasses.replace(s, sha256=sha256_file(fp))
            if s.data_file:
                dp = root / _safe_rel(s.data_file, f"stage '{n}' external data")
                if not dp.is_file():
                    raise BundleError(f"{dp} (stage '{n}' external data) does not exist; write "
                                      "it before the manifest")
                stages[n] = dataclasses.replace(stages[n], data_sha256=sha256_file(dp))
        constants = manifest.constants
        if constants is not None:
            fp = root / _safe_rel(constants.file, "constants")
            if not fp.is_file():
                raise BundleError(f"{fp} (constants) does not exist; write it before the "
                                  "manifest")
            constants = dataclasses.replace(constants, sha256=sha256_file(fp))
        manifest = dataclasses.replace(manifest, stages=stages, constants=constants)
    data = manifest.to_dict()
    checked = manifest_from_dict(json.loads(json.dumps(data)), root)  # round-trip validation
    atomic_write_text(root / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")
    return checked


#: The host constants a pipeline needs from ``constants.npz``.
REQUIRED_CONSTANTS = ("bg_slots", "seg_query_feat")


def load_constants(manifest: BundleManifest) -> dict:
    """The bundle's host-side constants (``constants.npz``) as float32 arrays by name:
    ``bg_slots`` (S, C) and ``seg_query_feat`` (Q, C) (official ``tracker.bg_slots`` /
    ``sem_seg_head.predictor.query_feat``), plus any others the exporter wrote.

    Raises :class:`BundleError` when the bundle has no constants file, it cannot be read, or it
    lacks one of :data:`REQUIRED_CONSTANTS`.
    """
    import numpy as np

    if manifest.constants is None:
        raise BundleError(f"bundle {manifest.root} has no constants file (bg_slots, "
                          "seg_query_feat); re-export it")
    path = manifest.root / manifest.constants.file
    try:
        with np.load(path) as z:
            constants = {k: np.asarray(z[k], np.float32) for k in z.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}; re-export the bundle") from None
    for key in REQUIRED_CONSTANTS:
        if key not in constants:
            raise BundleError(f"{path} lacks '{key}'; re-export the bundle")
    return constants
