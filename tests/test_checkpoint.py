"""Checkpoint reading / strict loading / seeded writing (dvis_trt.export.checkpoint)."""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dvis_trt.export.checkpoint import (
    LoadReport,
    load_checkpoint,
    load_state_dict_file,
    official_empty_weight,
    write_random_checkpoint,
)
from dvis_trt.errors import CheckpointError, InputError

REF = Path(os.environ.get("DVIS_TRT_REFERENCE", "/work/shared/reference"))
R50_KEYS = REF / "dvis_daq_offline_r50_ovis.keys.tsv"
needs_keys = pytest.mark.skipif(not R50_KEYS.is_file(), reason="reference keys tsv not present")


# ------------------------------------------------------------------------------------------------
# Stand-in models
# ------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """A few layer kinds with official-style names, a persistent and a non-persistent buffer."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)
        self.class_embed = nn.Linear(8, num_classes + 1)
        self.query_feat = nn.Parameter(torch.zeros(5, 8))  # no reset method owns this one
        self.register_buffer("running_var", torch.ones(4))
        self.register_buffer("pixel_mean", torch.tensor([1.0, 2.0, 3.0]), persistent=False)


def read_spec(path: Path, drop=()):
    """(name, shape) of each row of a ``*.keys.tsv`` (name, comma-separated shape, dtype)."""
    rows = []
    for line in path.read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        if name in drop:
            continue
        rows.append((name, tuple(int(x) for x in shape.split(",")) if shape else ()))
    return rows


def module_from_spec(spec, shrink=True, class_rows=None):
    """An nn.Module whose state dict has exactly ``spec``'s names (in order).

    shrink: every dim capped at 3 (fast), except the class dims of class_embed / empty_weight,
    which keep their size (or become ``class_rows``): the names are what matter here.
    """
    root = nn.Module()
    for name, shape in spec:
        *parents, leaf = name.split(".")
        node = root
        for p in parents:
            if p not in node._modules:
                node.add_module(p, nn.Module())
            node = node._modules[p]
        is_class = "class_embed" in name or name.endswith("empty_weight")
        if is_class:
            rows = class_rows if class_rows is not None else shape[0]
            shape = (rows,) + tuple(min(d, 3) for d in shape[1:]) if shrink else (rows,) + shape[1:]
        elif shrink:
            shape = tuple(min(d, 3) for d in shape)
        node.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    return root


def _saved(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# write_random_checkpoint
# ------------------------------------------------------------------------------------------------
def test_write_layout_seed_and_strict_roundtrip(tmp_path):
    model = Tiny(num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    p = write_random_checkpoint(model, tmp_path / "a.pth", seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched

    obj = _saved(p)
    assert list(obj) == ["model"]
    sd = obj["model"]
    assert list(sd) == list(model.state_dict()) + ["daq_criterion.empty_weight"]
    assert torch.equal(sd["daq_criterion.empty_weight"], torch.tensor([1.0, 1.0, 1.0, 0.1]))
    assert torch.equal(sd["running_var"], torch.ones(4))  # buffers keep their values
    assert torch.equal(sd["norm.weight"], torch.ones(8))  # LayerNorm's own init
    assert sd["query_feat"].abs().sum() > 0  # re-initialised although no reset method owns it

    # same seed -> identical bytes of every tensor (even from a differently initialised model);
    # another seed -> different weights
    other = Tiny(num_classes=3)
    with torch.no_grad():
        for t in other.parameters():
            t.add_(1.0)
    sd2 = _saved(write_random_checkpoint(other, tmp_path / "b.pth", seed=7))["model"]
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    sd3 = _saved(write_random_checkpoint(model, tmp_path / "c.pth", seed=8))["model"]
    assert not torch.equal(sd["class_embed.weight"], sd3["class_embed.weight"])

    # strict load into a fresh model reproduces the file's tensors exactly
    fresh = Tiny(num_classes=3)
    report = load_checkpoint(fresh, p, config_name="tiny.yaml")
    assert isinstance(report, LoadReport) and report.ok
    assert report.ignored == ["daq_criterion.empty_weight"]
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert torch.equal(fresh.pixel_mean, torch.tensor([1.0, 2.0, 3.0]))


def test_write_with_factory_equals_seeded_construction(tmp_path):
    p = write_random_checkpoint(lambda: Tiny(2), tmp_path / "f.pth", seed=3)
    torch.manual_seed(3)
    direct = Tiny(2).state_dict()
    sd = _saved(p)["model"]
    for k, v in direct.items():
        assert torch.equal(sd[k], v), k
    assert sd["daq_criterion.empty_weight"].shape == (3,)


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "w.pth"
    target.write_bytes(b"old contents")

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_random_checkpoint(Tiny(), target, seed=0)
    assert target.read_bytes() == b"old contents"
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]  # no temp file left behind


def test_official_empty_weight():
    w = official_empty_weight(25)
    assert w.shape == (26,) and w[:25].eq(1).all() and w[25].item() == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------
# The R50 OVIS layout (names and order from the official state dict)
# ------------------------------------------------------------------------------------------------
@needs_keys
def test_r50_layout_write_and_strict_load(tmp_path):
    spec = read_spec(R50_KEYS)
    model = module_from_spec(spec, class_rows=None)
    # the port has no criterion: build the stand-in without the training-only buffer
    model_no_crit = module_from_spec([s for s in spec if not s[0].startswith("daq_criterion.")])
    p = write_random_checkpoint(model_no_crit, tmp_path / "r50.pth", seed=0)
    sd = _saved(p)["model"]
    assert list(sd) == [name for name, _ in spec]  # official order, empty_weight before refiner
    assert sd["daq_criterion.empty_weight"].shape == (26,)
    report = load_checkpoint(model_no_crit, p, config_name="DAQ_Offline_R50.yaml")
    assert report.ok and report.ignored == ["daq_criterion.empty_weight"]
    assert len(report.loaded) == len(spec) - 1
    # a model that does carry the criterion buffer loads it too
    report = load_checkpoint(model, p)
    assert report.ok and report.ignored == [] and "daq_criterion.empty_weight" in report.loaded


@needs_keys
def test_wrong_class_count_fails_loudly(tmp_path):
    spec = [s for s in read_spec(R50_KEYS) if not s[0].startswith("daq_criterion.")]
    ytvis_like = module_from_spec(spec, class_rows=41)   # a 40-class checkpoint
    ovis_model = module_from_spec(spec, class_rows=26)   # a 25-class config
    p = write_random_checkpoint(ytvis_like, tmp_path / "ytvis.pth", seed=1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ovis_model, p, config_name="configs/dvis_daq/ovis/DAQ_Offline_R50.yaml")
    msg = str(err.value)
    # independent count: rows of the official key list with the class dimension
    class_keys = [n for n, shape in spec if shape and shape[0] == 26]
    assert len(class_keys) == 6
    assert "\n" not in msg
    assert f"{len(class_keys)} shape-mismatched" in msg
    assert "0 missing" in msg and "0 unexpected" in msg
    assert "configs/dvis_daq/ovis/DAQ_Offline_R50.yaml" in msg
    for name in class_keys[:5]:
        assert name in msg
    assert "sem_seg_head.predictor.class_embed.weight: checkpoint (41, 3) vs model (26, 3)" in msg
    assert "40 classes" in msg and "25" in msg
    # nothing was loaded: the model still holds its zeros
    assert all(v.abs().sum() == 0 for v in ovis_model.state_dict().values())


@needs_keys
def test_missing_and_unexpected_keys_listed(tmp_path):
    spec = [s for s in read_spec(R50_KEYS) if not s[0].startswith("daq_criterion.")]
    model = module_from_spec(spec)
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    removed = list(state)[100:107]
    for k in removed:
        del state[k]
    state["tracker.extra_a"] = torch.zeros(1)
    state["tracker.extra_b"] = torch.zeros(1)
    state["pixel_mean"] = torch.zeros(3)  # old checkpoints: tolerated
    torch.save({"model": state}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, tmp_path / "m.pth", config_name="x.yaml")
    msg = str(err.value)
    assert "7 missing" in msg and "2 unexpected" in msg and "0 shape-mismatched" in msg
    assert all(k in msg for k in removed[:5]) and removed[5] not in msg
    assert "tracker.extra_a" in msg and "pixel_mean" not in msg

    report = load_checkpoint(model, tmp_path / "m.pth", strict=False)
    assert report.missing == removed
    assert report.unexpected == ["tracker.extra_a", "tracker.extra_b"]
    assert report.ignored == ["pixel_mean"]


@pytest.mark.slow
@needs_keys
def test_r50_full_size_roundtrip(tmp_path):
    spec = [s for s in read_spec(R50_KEYS) if not s[0].startswith("daq_criterion.")]
    model = module_from_spec(spec, shrink=False)
    p = write_random_checkpoint(model, tmp_path / "full.pth", seed=0)
    sd = load_state_dict_file(p)
    assert [(k, tuple(v.shape)) for k, v in sd.items() if k != "daq_criterion.empty_weight"] == spec
    assert sum(v.numel() for v in sd.values()) == 74_143_977  # reference README
    assert load_checkpoint(model, p).ok


# ------------------------------------------------------------------------------------------------
# File formats
# ------------------------------------------------------------------------------------------------
def _arrays():
    rng = np.random.default_rng(0)
    return OrderedDict([("a.weight", rng.standard_normal((2, 3)).astype(np.float32)),
                        ("a.bias", rng.standard_normal(2).astype(np.float32))])


def test_bare_and_wrapped_pth_and_module_prefix(tmp_path):
    arrays = _arrays()
    tensors = OrderedDict((k, torch.from_numpy(v)) for k, v in arrays.items())
    torch.save(tensors, tmp_path / "bare.pth")
    torch.save({"model": tensors, "iteration": 5, "optimizer": {"state": {}}}, tmp_path / "w.pth")
    torch.save({"model": {f"module.{k}": v for k, v in tensors.items()}}, tmp_path / "dp.pth")
    for name in ("bare.pth", "w.pth", "dp.pth"):
        sd = load_state_dict_file(tmp_path / name)
        assert list(sd) == list(arrays), name
        for k, v in arrays.items():
            assert np.array_equal(sd[k].numpy(), v)


def test_detectron2_pkl(tmp_path):
    arrays = _arrays()
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": dict(arrays), "__author__": "someone", "matching_heuristics": True},
                    f, protocol=2)
    sd = load_state_dict_file(tmp_path / "zoo.pkl")
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    for k, v in arrays.items():
        assert np.array_equal(sd[k].numpy(), v)
    model = nn.Module()
    model.a = nn.Linear(3, 2)
    assert load_checkpoint(model, tmp_path / "zoo.pkl").ok
    assert np.array_equal(model.a.weight.detach().numpy(), arrays["a.weight"])


def test_numpy1_style_pkl(tmp_path):
    # files written under numpy 1.x name numpy.core.multiarray (numpy 2 renamed it numpy._core)
    raw = pickle.dumps({"model": dict(_arrays())}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "old.pkl").write_bytes(raw)
    sd = load_state_dict_file(tmp_path / "old.pkl")
    assert np.array_equal(sd["a.bias"].numpy(), _arrays()["a.bias"])


def test_caffe2_blobs_pkl_drops_momentum(tmp_path):
    blobs = dict(_arrays())
    blobs["a.weight_momentum"] = np.zeros((2, 3), np.float32)
    with open(tmp_path / "c2.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    assert list(load_state_dict_file(tmp_path / "c2.pkl")) == ["a.weight", "a.bias"]


_EXECUTED = []


def _side_effect():
    _EXECUTED.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


def test_pickled_code_is_refused_not_run(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"x": _Evil()}}, f)
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        load_state_dict_file(tmp_path / "evil.pkl")
    torch.save({"model": {"x": torch.zeros(1)}, "extra": _Evil()}, tmp_path / "evil.pth")
    _EXECUTED.clear()
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        load_state_dict_file(tmp_path / "evil.pth")
    assert _EXECUTED == []
    # the caller may opt in for a trusted file
    assert list(load_state_dict_file(tmp_path / "evil.pth", allow_unsafe_pickle=True)) == ["x"]
    assert _EXECUTED == [True]


@pytest.mark.parametrize("kind", ["zip", "legacy", "pkl"])
def test_truncated_file_is_one_line_checkpoint_error(tmp_path, kind):
    tensors = {"w": torch.arange(4000, dtype=torch.float32)}
    path = tmp_path / ("t.pkl" if kind == "pkl" else "t.pth")
    if kind == "pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": {"w": tensors["w"].numpy()}}, f)
    else:
        torch.save({"model": tensors}, path, _use_new_zipfile_serialization=(kind == "zip"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_state_dict_file(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_garbage_empty_and_wrong_content(tmp_path):
    (tmp_path / "g.pth").write_bytes(os.urandom(256))
    (tmp_path / "e.pth").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "l.pth")
    torch.save({"model": {"w": 3}}, tmp_path / "s.pth")
    for name, pattern in [("g.pth", "cannot read|not a PyTorch"), ("e.pth", "empty"), ("l.pth", "list"),
                          ("s.pth", "'w'")]:
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_state_dict_file(tmp_path / name)
        assert "\n" not in str(err.value)


def test_missing_path_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pth")
    with pytest.raises(InputError, match="directory"):
        load_state_dict_file(tmp_path)
    with pytest.raises(InputError):
        load_checkpoint(Tiny(), tmp_path / "nope.pth")


def test_nan_weights_are_refused_with_the_key(tmp_path):
    model = nn.Linear(3, 2)
    state = model.state_dict()
    state["weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN/Inf .*\(weight\)"):
        load_checkpoint(nn.Linear(3, 2), state)


def test_text_file_named_pth_is_called_what_it_is(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="neither a zip archive nor a pickle") as err:
        load_state_dict_file(path)
    assert "weights_only" not in str(err.value)
