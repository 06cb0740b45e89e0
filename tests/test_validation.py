"""Every input value validated at the border: manifest values, dataset json fields, numeric
options, image sizes -- one clear line and exit code 2, never an internal error (rc 70)."""
from __future__ import annotations

import json
import shutil

import pytest

from dvis_trt.runtime.cli import main
from dvis_trt.errors import BundleError, InputError
from dvis_trt.runtime.bundle import load_manifest
from dvis_trt.runtime.validate import available_cpus, clamp_threads
from dvis_trt.runtime.video import load_ytvis_videos


def _one_line_rc2(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside main
        rc = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------ manifest
@pytest.mark.parametrize("key,value,msg", [
    ("pixel_std", [0, 57.1, 57.4], "must be > 0"),
    ("pixel_std", [float("nan"), 1, 1], "finite"),
    ("pixel_mean", [float("inf"), 1, 1], "finite"),
    ("min_size_test", 100_000, "1..8192"),
    ("max_size_test", 50, "must not exceed max_size_test"),
    ("inference_select_threshold", 1.5, "probability"),
    ("dis_fg_threshold", float("nan"), "probability"),
    ("num_queries", 10 ** 9, "far beyond"),
    ("size_divisibility", -32, "0..1024"),
    ("noise_frame_num", -1, ">= 0"),
    ("input_format", "YUV", "RGB"),
])
def test_manifest_values_are_checked(tiny_bundle, tmp_path, capsys, key, value, msg):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    m = json.loads((d / "manifest.json").read_text())
    m["config"][key] = value
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=msg):
        load_manifest(d, verify=False)
    line = _one_line_rc2(["run", str(d), str(d / "x.mp4"), "-o", str(tmp_path / "o.json")],
                         capsys)
    assert msg.split()[0] in line


# ------------------------------------------------------------------------------ dataset json
@pytest.mark.parametrize("video,msg", [
    ({"id": "7", "file_names": ["a/0.jpg"]}, "integer 'id'"),
    ({"id": True, "file_names": ["a/0.jpg"]}, "integer 'id'"),
    ({"id": 1, "file_names": "a/0.jpg"}, "non-empty list"),
    ({"id": 1, "file_names": ["a/0.jpg", 5]}, "non-empty list"),
    ({"id": 1, "file_names": ["/etc/passwd"]}, "relative"),
    ({"id": 1, "file_names": ["../../x.jpg"]}, "relative"),
    ({"id": 1, "file_names": ["a/0.jpg", "a/1.jpg"], "length": 5}, "length 5"),
    ({"id": 1, "file_names": ["a/0.jpg"], "width": "wide"}, "width"),
])
def test_dataset_json_fields_are_checked(tmp_path, video, msg):
    j = tmp_path / "valid.json"
    j.write_text(json.dumps({"videos": [video]}))
    with pytest.raises(InputError, match=msg):
        load_ytvis_videos(j, tmp_path)


def test_dataset_json_duplicate_ids(tmp_path, capsys, tiny_bundle):
    j = tmp_path / "valid.json"
    j.write_text(json.dumps({"videos": [{"id": 3, "file_names": ["a/0.jpg"]},
                                        {"id": 3, "file_names": ["b/0.jpg"]}]}))
    with pytest.raises(InputError, match="appears twice"):
        load_ytvis_videos(j, tmp_path)
    line = _one_line_rc2(["run", str(tiny_bundle), "--ytvis-json", str(j), "--ytvis-root",
                          str(tmp_path), "-o", str(tmp_path / "o.json")], capsys)
    assert "appears twice" in line


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("argv,opt", [
    (["--memory-gb", "nan"], "--memory-gb"),
    (["--memory-gb", "-2"], "--memory-gb"),
    (["--memory-gb", "inf"], "--memory-gb"),
    (["--window", "100000"], "--window"),
    (["--threads", "0"], "--threads"),
    (["--threads", "99999"], "--threads"),
    (["--overlay-min-score", "nan"], "--overlay-min-score"),
    (["--clip-frames", "-1"], "--clip-frames"),
])
def test_run_numeric_options(tmp_path, capsys, argv, opt):
    line = _one_line_rc2(["run", str(tmp_path), str(tmp_path / "v.mp4"), *argv], capsys)
    assert opt in line


@pytest.mark.parametrize("cmd,argv,opt", [
    ("check", ["B", "--rtol", "nan"], "--rtol"),
    ("check", ["B", "--frames", "0"], "--frames"),
    ("bench", ["--bundle", "B", "--video", "v", "--repeats", "0"], "--repeats"),
    ("bench", ["--bundle", "B", "--video", "v", "--parity-iou", "2"], "--parity-iou"),
    ("bench", ["--bundle", "B", "--video", "v", "--threads", "-4"], "--threads"),
    ("export", ["--config-file", "c", "--checkpoint", "k", "--output", "o", "--window", "0"],
     "--window"),
    ("build", ["B", "--workspace", "nan"], "--workspace"),
])
def test_other_commands_numeric_options(capsys, cmd, argv, opt):
    assert opt in _one_line_rc2([cmd, *argv], capsys)


def test_threads_above_cpus_are_clamped_with_a_warning(capsys):
    n = available_cpus()
    assert clamp_threads(n + 100) == n
    assert "using" in capsys.readouterr().err
    assert clamp_threads(1) == 1 and clamp_threads(None) is None


def test_export_example_size_capped():
    from dvis_trt.export.cli_export import parse_size
    with pytest.raises(InputError, match="1..8192"):
        parse_size("100000x100000")
    assert parse_size("480x864") == (480, 864)
