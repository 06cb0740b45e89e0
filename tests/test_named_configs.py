"""Configs by name (export/named_configs.py): each packaged file resolves to what the official
chain resolves to; names, paths and typos; `dvis-trt configs`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dvis_trt.export.named_configs import (NAMED_CONFIGS, describe_all, load_named_config,
                                           resolve_config)
from dvis_trt.export.config import inference_values, load_config
from dvis_trt.errors import InputError

REF = Path(os.environ.get("DVIS_TRT_REFERENCE", "/work/shared/reference"))
OFFICIAL_ROOT = REF  # official files live under REF/configs/... (paths as in the repository)

#: keys allowed to differ from the official resolution, and why: the packaged ViT-L files read
#: no DINOv2 file (the trained checkpoint holds the ViT weights) and FREEZE_VIT is a training
#: switch; WEIGHTS / DEVICE are run options, not the model.
ALLOWED = {("MODEL", "WEIGHTS"), ("MODEL", "DEVICE"), ("MODEL", "VIT_ADAPTER", "VIT_WEIGHT"),
           ("MODEL", "VIT_ADAPTER", "FREEZE_VIT")}


def _drop(tree, keys, path=()):
    out = {}
    for k, v in tree.items():
        p = path + (k,)
        if p in keys:
            continue
        out[k] = _drop(v, keys, p) if isinstance(v, dict) else v
    return out


@pytest.mark.parametrize("name", [n for n, c in NAMED_CONFIGS.items() if c.official])
def test_packaged_config_resolves_like_the_official_chain(name):
    official = OFFICIAL_ROOT / NAMED_CONFIGS[name].official.replace("DVIS_DAQ/", "", 1)
    if not official.is_file():
        pytest.skip(f"official config {official} not present")
    ours, theirs = load_named_config(name), load_config(official)
    assert _drop({"MODEL": ours.to_dict()["MODEL"]}, ALLOWED) == \
        _drop({"MODEL": theirs.to_dict()["MODEL"]}, ALLOWED)
    for key in ("FORMAT", "MIN_SIZE_TEST", "MAX_SIZE_TEST"):
        assert ours.INPUT[key] == theirs.INPUT[key]
    a, b = inference_values(ours), inference_values(theirs)
    a.pop("source"), b.pop("source")
    assert a == b


def test_names_paths_and_mistakes(tmp_path):
    path, named = resolve_config("r50-ovis")
    assert named.name == "r50-ovis" and path.is_file() and path.suffix == ".yaml"
    assert resolve_config("VITL-YTVIS19")[1].name == "vitl-ytvis19"
    own = tmp_path / "mine.yaml"
    own.write_text(f"_BASE_: {path}\nMODEL:\n  SEM_SEG_HEAD:\n    NUM_CLASSES: 3\n")
    p, n = resolve_config(str(own))
    assert n is None and load_named_config(p).MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3
    with pytest.raises(InputError, match="did you mean r50-ovis"):
        resolve_config("r50_ovis")
    with pytest.raises(InputError, match="config file nope/cfg.yaml not found"):
        resolve_config("nope/cfg.yaml")


def test_configs_lists_every_name(capsys):
    from dvis_trt.runtime.cli import main
    rows = {r["name"]: r for r in describe_all()}
    assert set(rows) == set(NAMED_CONFIGS)
    assert (rows["r50-ovis"]["classes"], rows["vitl-ytvis19"]["classes"],
            rows["vitl-ytvis21"]["classes"]) == (25, 40, 40)
    assert rows["vitl-ovis"]["queries"] == 200
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in NAMED_CONFIGS:
        assert name in out
    assert "DAQ_Offline_R50.yaml" in out
    assert main(["configs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "r50-ovis"


@pytest.mark.parametrize("name,keys_tsv", [("r50-ovis", "dvis_daq_offline_r50_ovis.keys.tsv"),
                                           ("vitl-ovis", "dvis_daq_offline_vitl_ovis.keys.tsv"),
                                           ("vitl-ytvis19", None), ("vitl-ytvis21", None)])
def test_every_name_builds_its_model(name, keys_tsv):
    """Each name builds (on the meta device, no memory); where the official model's state-dict
    keys are known, ours are the same, in order."""
    torch = pytest.importorskip("torch")
    from dvis_trt.export.model.build import build_model
    with torch.device("meta"):
        sd = build_model(load_named_config(name)).state_dict()
    k = int(load_named_config(name).MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    assert tuple(sd["sem_seg_head.predictor.class_embed.weight"].shape)[0] == k + 1
    if keys_tsv and (REF / keys_tsv).is_file():
        ref = [ln.split("\t")[0] for ln in (REF / keys_tsv).read_text().splitlines()]
        assert list(sd) == ref
