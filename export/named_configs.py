"""Configs by name: the official DVIS-DAQ offline configs we support, as short names.

``dvis-trt export model.pth --config r50-ovis`` picks the packaged file of resolved values for
the official ``configs/dvis_daq/ovis/DAQ_Offline_R50.yaml``; ``--config my/config.yaml`` (or the
older ``--config-file``) still reads any official-style YAML with its ``_BASE_`` chain.
``dvis-trt configs`` lists the names (:func:`describe_all`).

The packaged files (``configs/*.yaml`` next to the config reader) are our own: the model and
inference values the official chain resolves to, written flat (``tests/test_named_configs.py``
checks each against the official resolution). The official offline DAQ configs are R50 for OVIS
and ViT-Adapter-L for OVIS / YouTube-VIS 2019 / 2021; the official repository has no offline
DAQ R50 config for YouTube-VIS, so there is no ``r50-ytvis*`` name.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from dvis_trt.errors import InputError

__all__ = ["NamedConfig", "NAMED_CONFIGS", "packaged_dir", "resolve_config", "load_named_config",
           "describe_all", "config_label", "eager_config_source"]


@dataclass(frozen=True)
class NamedConfig:
    """One selectable config: ``name`` -> packaged ``file`` resolved from ``official``."""

    name: str
    file: str          # packaged file name (in :func:`packaged_dir`)
    backbone: str
    dataset: str
    official: Optional[str]   # the official file the values were resolved from (repo-relative)
    note: str = ""


NAMED_CONFIGS: Dict[str, NamedConfig] = {c.name: c for c in (
    NamedConfig("r50-ovis", "dvis_daq_offline_r50_ovis.yaml", "ResNet-50", "OVIS",
                "DVIS_DAQ/configs/dvis_daq/ovis/DAQ_Offline_R50.yaml"),
    NamedConfig("vitl-ovis", "dvis_daq_offline_vitl_ovis.yaml", "ViT-Adapter-L", "OVIS",
                "DVIS_DAQ/configs/dvis_daq/ovis/vit_adapter/DAQ_Offline_VitAdapterL.yaml"),
    NamedConfig("vitl-ytvis19", "dvis_daq_offline_vitl_ytvis19.yaml", "ViT-Adapter-L",
                "YouTube-VIS 2019",
                "DVIS_DAQ/configs/dvis_daq/ytvis19/vit_adapter/DAQ_Offline_VitAdapterL.yaml"),
    NamedConfig("vitl-ytvis21", "dvis_daq_offline_vitl_ytvis21.yaml", "ViT-Adapter-L",
                "YouTube-VIS 2021",
                "DVIS_DAQ/configs/dvis_daq/ytvis21/vit_adapter/DAQ_Offline_VitAdapterL.yaml"),
    NamedConfig("r50-ovis-online", "dvis_daq_online_r50_ovis.yaml", "ResNet-50", "OVIS",
                "DVIS_DAQ/configs/dvis_daq/ovis/DAQ_Online_R50.yaml",
                "the online model (no refiner): its bundles serve `stream --mode online`"),
    NamedConfig("tiny", "tiny.yaml", "ResNet (reduced)", "OVIS", None,
                "not official: r50-ovis with small widths, for the demo and tests"),
    NamedConfig("tiny-vit", "tiny_vit.yaml", "ViT-Adapter (reduced)", "OVIS", None,
                "not official: vitl-ovis with small widths and depth, for the demo and tests"),
)}


def packaged_dir() -> Path:
    """Folder of the packaged config files (package data next to the config reader)."""
    from dvis_trt.export import config as _config

    return Path(_config.__file__).resolve().parent / "configs"


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text


def resolve_config(name_or_path: Union[str, os.PathLike]) -> Tuple[Path, Optional[NamedConfig]]:
    """``"r50-ovis"`` -> (packaged file, its :class:`NamedConfig`); a YAML path -> (path, None).

    Raises:
        InputError: neither a known name nor an existing file (with the closest name).
    """
    text = os.fspath(name_or_path)
    named = NAMED_CONFIGS.get(text.strip().lower())
    if named is not None and not Path(text).is_file():
        return packaged_dir() / named.file, named
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return path, None
    if _looks_like_path(text):
        raise InputError(f"config file {text} not found; pass an existing .yaml file or a name "
                         f"from `dvis-trt configs` ({', '.join(NAMED_CONFIGS)})")
    close = difflib.get_close_matches(text.lower(), list(NAMED_CONFIGS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise InputError(f"unknown config {text!r}: {hint}names are {', '.join(NAMED_CONFIGS)} "
                     "(`dvis-trt configs`), or give the path of your official YAML file")


def load_named_config(name_or_path: Union[str, os.PathLike],
                      overrides: Union[Sequence[str], None] = None):
    """:func:`~dvis_trt.export.config.load_config` of a name or a path (see :func:`resolve_config`)."""
    from dvis_trt.export.config import load_config

    path, _ = resolve_config(name_or_path)
    return load_config(path, overrides)


def config_label(name_or_path: Union[str, os.PathLike]) -> str:
    """How to name a config in messages and records: ``"r50-ovis"`` or the file path."""
    text = os.fspath(name_or_path)
    return text if text.strip().lower() in NAMED_CONFIGS and not Path(text).is_file() else \
        str(Path(text).absolute())


def describe_all() -> List[Dict[str, object]]:
    """One row per name: name, backbone, dataset, classes (count), queries, file, resolved_from."""
    from dvis_trt.export.config import load_config

    rows = []
    for c in NAMED_CONFIGS.values():
        cfg = load_config(packaged_dir() / c.file)
        rows.append({"name": c.name, "backbone": c.backbone, "dataset": c.dataset,
                     "classes": int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
                     "queries": int(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES),
                     "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
                     "file": str(packaged_dir() / c.file),
                     "resolved_from": c.official or c.note})
    return rows


def eager_config_source(manifest) -> Tuple[Optional[str], List[str]]:
    """(config file, overrides) that rebuild a bundle's eager model (no flags needed).

    A packaged config recorded by name in the manifest (``producer.config.name``, see
    :mod:`dvis_trt.runtime.provenance`) is looked up again in this installation, so the bundle
    survives a reinstall that moved the package; otherwise the manifest's ``config.source``.
    Overrides are the recorded ``producer.config_overrides``.
    """
    prod = getattr(manifest, "producer", None) or {}
    overrides = [str(o) for o in (prod.get("config_overrides") or [])]
    rec = prod.get("config")
    if isinstance(rec, dict) and rec.get("name") in NAMED_CONFIGS:
        return str(packaged_dir() / NAMED_CONFIGS[rec["name"]].file), overrides
    return getattr(getattr(manifest, "config", None), "source", None), overrides
