"""A bundle's provenance: which checkpoint and config it was exported from.

``dvis-trt export`` records, in the manifest's ``producer`` block::

    "checkpoint": {"path": "/abs/model_final.pth", "sha256": "<64 hex>", "bytes": 297123456}
    "config": {"name": "r50-ovis" | null, "path": "/abs/file.yaml"}
    "config_overrides": ["KEY=VALUE", ...]           (as before)
    "dvis_trt", "torch", "onnx", "onnxruntime", ...  (versions, as before)

so ``check``, ``bench`` and ``run --backend torch`` rebuild the eager baseline without flags
(:func:`recorded_checkpoint` here; the config: ``dvis_trt.export.named_configs.eager_config_source``),
and refuse in one line when the
checkpoint file changed since the export (its sha256 differs). Bundles exported before this
record existed simply have none (the commands then ask for ``--checkpoint``).
No torch here: hashing and path checks only.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from dvis_trt.errors import InputError

__all__ = ["checkpoint_record", "config_record", "recorded_checkpoint", "recorded_sources",
           "file_sha256"]

PathLike = Union[str, "os.PathLike[str]"]


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (4 MiB reads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_record(path: PathLike) -> Dict[str, Any]:
    """``{"path": absolute, "sha256": hex, "bytes": size}`` of a checkpoint file."""
    p = Path(path).absolute()
    return {"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size}


def config_record(name: Optional[str], path: PathLike) -> Dict[str, Any]:
    """``{"name": "r50-ovis" or None, "path": absolute}`` (name: a packaged config's short name)."""
    return {"name": name, "path": str(Path(path).absolute())}


def _producer(manifest: Any) -> Mapping[str, Any]:
    prod = getattr(manifest, "producer", None) or {}
    return prod if isinstance(prod, Mapping) else {}


def recorded_checkpoint(manifest: Any, *, needed_for: Optional[str] = None) -> Optional[Path]:
    """The checkpoint the bundle was exported from, verified against its recorded sha256.

    Args:
        manifest: a loaded bundle manifest (``producer`` and ``root`` are read).
        needed_for: what needs it (``"the torch side of the check"``): when given, a bundle
            without a usable record raises instead of returning None.
    Returns:
        the path, or None (no record, or the file is gone) when ``needed_for`` is None.
    Raises:
        InputError: the file's sha256 differs from the recorded one (it changed since the
            export), or — with ``needed_for`` — no record / the recorded file is missing.
    """
    rec = _producer(manifest).get("checkpoint")
    root = getattr(manifest, "root", "the bundle")
    if isinstance(rec, str):  # a bare path (older writers)
        rec = {"path": rec}
    if not isinstance(rec, Mapping) or not rec.get("path"):
        if needed_for:
            raise InputError(f"{needed_for} needs --checkpoint: bundle {root} records no "
                             "checkpoint (exported by an older dvis-trt)")
        return None
    path = Path(str(rec["path"]))
    if not path.is_file():
        if needed_for:
            raise InputError(f"{needed_for} needs the checkpoint bundle {root} was exported from, "
                             f"{path}, which is not there any more; pass --checkpoint")
        return None
    want = rec.get("sha256")
    if want:
        size = rec.get("bytes")
        same_size = size is None or int(size) == path.stat().st_size
        if not same_size or file_sha256(path) != want:
            raise InputError(f"checkpoint {path} changed since bundle {root} was exported from it "
                             f"(sha256 differs from the recorded {str(want)[:12]}...); re-export "
                             "the bundle, or pass --checkpoint to compare with this file anyway")
    return path


def recorded_sources(manifest: Any) -> List[Tuple[str, Path]]:
    """``(label, path)`` of the checkpoint and config file the bundle records it was exported
    from, for the output-safety rule (:func:`dvis_trt.outputs.check_outputs`): an output of
    ``run`` or ``stream`` may not write over the bundle's source even when this run does not
    read it. No hashing; missing or malformed records give nothing."""
    prod = _producer(manifest)
    out: List[Tuple[str, Path]] = []
    for key, label in (("checkpoint", "the checkpoint the bundle was exported from"),
                       ("config", "the config the bundle was exported from")):
        rec = prod.get(key)
        if isinstance(rec, str):
            rec = {"path": rec}
        if isinstance(rec, Mapping) and isinstance(rec.get("path"), str) and rec["path"]:
            out.append((label, Path(rec["path"])))
    return out
