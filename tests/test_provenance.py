"""Export records its provenance (runtime/provenance.py): check / bench / run --backend torch
find the eager baseline's weights without flags, and refuse in one line when the file changed."""
from __future__ import annotations

import json
import shutil

import pytest

from dvis_trt.errors import InputError
from dvis_trt.runtime.bundle import load_manifest
from dvis_trt.runtime.provenance import file_sha256, recorded_checkpoint


def _copy_with_record(bundle, dest, checkpoint):
    shutil.copytree(bundle, dest)
    path = dest / "manifest.json"
    m = json.loads(path.read_text())
    if checkpoint is None:
        m["producer"].pop("checkpoint", None)
    else:
        m["producer"]["checkpoint"]["path"] = str(checkpoint)
    path.write_text(json.dumps(m, indent=2))
    return dest


def test_export_records_checkpoint_config_and_versions(tiny_bundle, tiny_checkpoint):
    prod = load_manifest(tiny_bundle).producer
    assert prod["checkpoint"] == {"path": str(tiny_checkpoint.absolute()),
                                  "sha256": file_sha256(tiny_checkpoint),
                                  "bytes": tiny_checkpoint.stat().st_size}
    assert prod["config"]["path"].endswith("tiny.yaml")
    for key in ("dvis_trt", "torch", "onnx", "onnxruntime", "opset"):
        assert prod[key]
    assert recorded_checkpoint(load_manifest(tiny_bundle)) == tiny_checkpoint.absolute()


def test_check_refuses_a_changed_or_missing_checkpoint(tiny_bundle, tiny_checkpoint,
                                                             tmp_path, capsys):
    """(`dvis-trt check bundle/` without --checkpoint passing is the README test's.)"""
    from dvis_trt.runtime.cli import main
    args = ["--stages", "refiner", "--tracks", "1", "--frames", "1", "--size", "96x160"]

    changed = tmp_path / "changed.pth"
    data = bytearray(tiny_checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    changed.write_bytes(bytes(data))
    bundle = _copy_with_record(tiny_bundle, tmp_path / "b1", changed)
    assert main(["check", str(bundle), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"checkpoint {changed} changed since bundle" in err
    with pytest.raises(InputError, match="changed since"):  # bench's baseline uses the same rule
        recorded_checkpoint(load_manifest(bundle))

    bundle = _copy_with_record(tiny_bundle, tmp_path / "b2", None)
    assert main(["check", str(bundle), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --checkpoint" in err and "records no checkpoint" in err
