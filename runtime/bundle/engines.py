"""The engine manifest (``BUNDLE/engines/<gpu>-sm<cc>-trt<ver>-<precision>/engines.json``) and
the staleness rules that decide whether prebuilt engines may run on this machine.

No TensorRT import here: the facts about the machine (:class:`MachineInfo`) are gathered by the
caller (:func:`dvis_trt.runtime.backends.trt.loader.machine_info` on a GPU machine) so that the rules are
testable anywhere.

A TensorRT engine (plan) is only valid for the exact TensorRT version and GPU model it was
built with (we build neither version- nor hardware-compatible engines: both cost speed), for
the plugin library whose kernels it references, and for the ONNX graph it was built from.
Any mismatch -> :class:`~dvis_trt.errors.BundleError` with one line:
``engine built for X, this machine is Y; run `dvis-trt build BUNDLE```.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from dvis_trt.errors import BundleError
from dvis_trt.fileio import atomic_write_text, sha256_file
from .manifest import BundleManifest
from .profiles import Profile
from .stages import PRECISIONS

__all__ = ["ENGINE_FORMAT_VERSION", "ENGINE_MANIFEST_NAME", "ENGINES_DIR", "MachineInfo",
           "StageEngine", "EngineManifest", "engine_dir_name", "gpu_slug",
           "staleness_reasons", "check_fresh", "find_engine_dir", "load_engine_manifest",
           "write_engine_manifest"]

ENGINE_FORMAT_VERSION = 1
ENGINE_MANIFEST_NAME = "engines.json"
ENGINES_DIR = "engines"


@dataclass(frozen=True)
class MachineInfo:
    """What an engine depends on: TensorRT version (``tensorrt.__version__``), GPU name (CUDA
    device name, e.g. ``"NVIDIA H200"``) and compute capability (``"9.0"``)."""

    trt_version: str
    gpu_name: str
    compute_capability: str

    @property
    def sm(self) -> str:
        """``"90"`` for compute capability ``"9.0"``."""
        return self.compute_capability.replace(".", "")

    def describe(self) -> str:
        return f"{self.gpu_name} (sm{self.sm}), TensorRT {self.trt_version}"


def gpu_slug(gpu_name: str) -> str:
    """Folder-safe GPU name: ``"NVIDIA GeForce RTX 4090"`` -> ``"nvidia-geforce-rtx-4090"``."""
    s = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return s or "gpu"


def engine_dir_name(machine: MachineInfo, precision: str) -> str:
    """``<gpu-name>-sm<cc>-trt<version>-<precision>``, e.g.
    ``nvidia-h200-sm90-trt11.1.0-fp16``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    version = re.sub(r"[^0-9A-Za-z.]+", "-", machine.trt_version)
    return f"{gpu_slug(machine.gpu_name)}-sm{machine.sm}-trt{version}-{precision}"


@dataclass(frozen=True)
class StageEngine:
    """One stage's engine: plan file (relative to the engine folder), its sha256, the sha256
    of the ONNX it was built from, and its optimization profiles (in engine order)."""

    file: str
    sha256: str
    onnx_sha256: str
    profiles: tuple[Profile, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "onnx_sha256": self.onnx_sha256,
                "profiles": [p.to_dict() for p in self.profiles]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "StageEngine":
        return cls(file=str(d["file"]), sha256=str(d["sha256"]),
                   onnx_sha256=str(d["onnx_sha256"]),
                   profiles=tuple(Profile.from_dict(p) for p in d["profiles"]))


@dataclass(frozen=True)
class EngineManifest:
    """Everything a runtime needs to decide whether the engines in a folder are usable."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    msda: str
    stages: dict[str, StageEngine]
    plugin_library: dict | None = None  # {"name": file name, "sha256": ...} or None
    limits: dict = field(default_factory=dict)
    builder: dict = field(default_factory=dict)  # workspace, timing cache, dvis_trt version ...
    format_version: int = ENGINE_FORMAT_VERSION
    root: Path | None = field(default=None, compare=False)

    @property
    def machine(self) -> MachineInfo:
        return MachineInfo(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def to_dict(self) -> dict:
        return {"format_version": self.format_version,
                "tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name,
                "compute_capability": self.compute_capability, "precision": self.precision,
                "msda": self.msda, "plugin_library": self.plugin_library,
                "limits": self.limits, "builder": self.builder,
                "stages": {k: v.to_dict() for k, v in self.stages.items()}}

    @classmethod
    def from_dict(cls, d: Mapping, root: Path | None = None) -> "EngineManifest":
        where = str(root / ENGINE_MANIFEST_NAME) if root else ENGINE_MANIFEST_NAME
        if not isinstance(d, Mapping):
            raise BundleError(f"{where} is not a JSON object; run `dvis-trt build` again")
        if d.get("format_version") != ENGINE_FORMAT_VERSION:
            raise BundleError(f"{where} has format_version {d.get('format_version')!r}, this "
                              f"dvis-trt reads {ENGINE_FORMAT_VERSION}; rebuild the engines "
                              "with `dvis-trt build`")
        try:
            return cls(tensorrt_version=str(d["tensorrt_version"]),
                       gpu_name=str(d["gpu_name"]),
                       compute_capability=str(d["compute_capability"]),
                       precision=str(d["precision"]), msda=str(d["msda"]),
                       stages={k: StageEngine.from_dict(v) for k, v in d["stages"].items()},
                       plugin_library=d.get("plugin_library"),
                       limits=dict(d.get("limits") or {}), builder=dict(d.get("builder") or {}),
                       root=root)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where} is incomplete or malformed ({exc!r}); rebuild the "
                              "engines with `dvis-trt build`") from None


# ---------------------------------------------------------------------------------------------
def staleness_reasons(engine: EngineManifest, bundle: BundleManifest, machine: MachineInfo,
                      plugin_sha256: str | None = None) -> list[str]:
    """Why ``engine`` must not run on ``machine`` with ``bundle`` (empty list: it may).

    Rules: same TensorRT version string; same compute capability; same GPU name; the engine's
    precision and MSDA mode equal the bundle's; every bundle stage has an engine built from the
    ONNX with the bundle's sha256 (a re-exported bundle needs new engines); when the engines
    were built with a plugin library, ``plugin_sha256`` (of the library this machine loads)
    must equal the recorded hash (``None``: the library is missing).
    """
    reasons = []
    if engine.tensorrt_version != machine.trt_version:
        reasons.append(f"TensorRT {engine.tensorrt_version}, this machine has TensorRT "
                       f"{machine.trt_version}")
    if engine.compute_capability != machine.compute_capability:
        reasons.append(f"compute capability {engine.compute_capability}, this GPU is "
                       f"{machine.compute_capability}")
    if engine.gpu_name != machine.gpu_name:
        reasons.append(f"GPU '{engine.gpu_name}', this machine is '{machine.gpu_name}'")
    if engine.precision != bundle.precision:
        reasons.append(f"precision {engine.precision}, the bundle is {bundle.precision}")
    if engine.msda != bundle.msda:
        reasons.append(f"--msda {engine.msda}, the bundle is --msda {bundle.msda}")
    for name, stage in bundle.stages.items():
        se = engine.stages.get(name)
        if se is None:
            reasons.append(f"no '{name}' engine")
        elif se.onnx_sha256 != stage.sha256:
            reasons.append(f"'{name}' ONNX {se.onnx_sha256[:12]}…, the bundle's is "
                           f"{stage.sha256[:12]}… (re-exported)")
    if engine.plugin_library:
        want = engine.plugin_library.get("sha256")
        lib = engine.plugin_library.get("name", "the plugin library")
        if plugin_sha256 is None:
            reasons.append(f"plugin library {lib}, which this machine does not load")
        elif plugin_sha256 != want:
            reasons.append(f"plugin library {lib} sha256 {str(want)[:12]}…, the loaded one is "
                           f"{plugin_sha256[:12]}…")
    return reasons


def check_fresh(engine: EngineManifest, bundle: BundleManifest, machine: MachineInfo,
                plugin_sha256: str | None = None) -> None:
    """Raise :class:`BundleError` (one line) if :func:`staleness_reasons` finds any reason."""
    reasons = staleness_reasons(engine, bundle, machine, plugin_sha256)
    if reasons:
        where = engine.root or "the engine folder"
        bundle_dir = bundle.root or "BUNDLE"
        raise BundleError(f"engines in {where} are stale: engine built for "
                          + "; ".join(reasons) + f"; run `dvis-trt build {bundle_dir}`")


def load_engine_manifest(engine_dir: str | os.PathLike, verify: bool = False) -> EngineManifest:
    """Read ``engine_dir/engines.json``; ``verify`` also checks each plan file's sha256.
    Raises :class:`BundleError`."""
    root = Path(engine_dir).resolve()
    path = root / ENGINE_MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path} is missing (an interrupted build?); run `dvis-trt build` "
                          "again")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} cannot be read ({exc}); run `dvis-trt build` again") from None
    em = EngineManifest.from_dict(data, root)
    for name, se in em.stages.items():
        fp = root / se.file
        if not fp.is_file():
            raise BundleError(f"{fp} ('{name}' engine) is missing; run `dvis-trt build` again")
        if verify and sha256_file(fp) != se.sha256:
            raise BundleError(f"{fp} ('{name}' engine) does not match its sha256; it is "
                              "corrupt — run `dvis-trt build` again")
    return em


def write_engine_manifest(engine_dir: str | os.PathLike, manifest: EngineManifest) -> None:
    """Write ``engines.json`` atomically (last step of a build: its presence marks a complete
    folder)."""
    root = Path(engine_dir)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / ENGINE_MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2)
                       + "\n")


def find_engine_dir(bundle: BundleManifest, machine: MachineInfo,
                    precision: str | None = None) -> Path:
    """The engine folder for this machine and the bundle's precision
    (``BUNDLE/engines/<engine_dir_name>``). Raises :class:`BundleError` naming the folders
    that do exist (built for other GPUs / TensorRT versions) and what to run."""
    if bundle.root is None:
        raise BundleError("bundle manifest has no folder; load it with load_manifest()")
    precision = precision or bundle.precision
    base = bundle.root / ENGINES_DIR
    want = base / engine_dir_name(machine, precision)
    if (want / ENGINE_MANIFEST_NAME).is_file():
        return want
    others = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    found = f" (found engines for: {', '.join(others)})" if others else ""
    raise BundleError(f"no {precision} engines for {machine.describe()} in {base}{found}; "
                      f"run `dvis-trt build {bundle.root}`")
