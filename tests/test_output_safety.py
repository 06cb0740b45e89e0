"""The output-safety rule (``dvis_trt.outputs``): every data-loss case of issue 11 is refused in
one line and every byte of the user's files is unchanged; re-export keeps a user's files;
temporaries are recognisable, short enough, and a killed run's are cleaned by the next run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dvis_trt.outputs import (BUNDLE_MARKER, MARKER_FORMAT, NAME_MAX, OutputRefused,
                              check_outputs, clean_stale_temps, commit_folder, owned_entries,
                              parse_temp_name, read_marker, temp_path, write_marker)
from dvis_trt.runtime.cli import main


def _snapshot(*roots: Path) -> dict:
    """path -> bytes of every file under ``roots`` (files or folders)."""
    out = {}
    for r in roots:
        r = Path(r)
        files = [r] if r.is_file() else [p for p in r.rglob("*") if p.is_file()]
        for p in files:
            out[str(p)] = p.read_bytes()
    return out


def _run(argv, capsys):
    rc = main(["run", *map(str, argv), "--quiet"])
    cap = capsys.readouterr()
    return rc, cap.err


@pytest.fixture()
def user(tmp_path, tiny_bundle):
    """A user's folder: a copy of the bundle, a checkpoint, frames, a dataset, class names."""
    u = tmp_path / "user"
    u.mkdir()
    bundle = u / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (u / "model_final.pth").write_bytes(os.urandom(4096))
    frames = u / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)).save(frames / f"{i:05d}.jpg")
    root = u / "JPEGImages"
    (root / "v1").mkdir(parents=True)
    for i in range(2):
        shutil.copy(frames / f"{i:05d}.jpg", root / "v1" / f"{i:05d}.jpg")
    (u / "valid.json").write_text(json.dumps({
        "videos": [{"id": 1, "file_names": ["v1/00000.jpg", "v1/00001.jpg"], "length": 2,
                    "width": 48, "height": 32}],
        "categories": [{"id": 1, "name": "a"}]}))
    (u / "names.txt").write_text("a\nb\nc\n")
    return u


# ------------------------------------------------------------------------------ run
@pytest.mark.parametrize("case", ["checkpoint", "recorded_checkpoint", "dataset_json", "class_names", "frame",
                                  "manifest", "symlink", "hardlink", "hardlink_frame",
                                  "overlay_on_input", "inside_bundle"])
def test_run_refuses_outputs_it_reads(user, capsys, case):
    b, ck, frames = user / "bundle", user / "model_final.pth", user / "frames"
    before = _snapshot(user)
    base = [b, frames]
    if case == "checkpoint":
        argv = base + ["-o", ck, "--backend", "torch", "--checkpoint", ck]
    elif case == "recorded_checkpoint":  # not read by an ORT run, but the bundle's source
        man = json.loads((b / "manifest.json").read_text())
        man["producer"]["checkpoint"] = {"path": str(ck)}
        (b / "manifest.json").write_text(json.dumps(man))
        before = _snapshot(user)
        argv = base + ["-o", ck]
    elif case == "dataset_json":
        argv = [b, "--ytvis-json", user / "valid.json", "--ytvis-root", user / "JPEGImages",
                "-o", user / "valid.json"]
    elif case == "class_names":
        argv = base + ["--class-names", user / "names.txt", "-o", user / "names.txt"]
    elif case == "frame":
        argv = base + ["-o", frames / "00001.jpg"]
    elif case == "manifest":
        argv = base + ["-o", b / "manifest.json"]
    elif case == "inside_bundle":
        argv = base + ["-o", b / "results.json"]
    elif case == "symlink":
        (user / "link.json").symlink_to(ck)
        before = _snapshot(user)
        argv = base + ["-o", user / "link.json", "--backend", "torch", "--checkpoint", ck]
    elif case == "hardlink":
        os.link(user / "names.txt", user / "hl.json")
        before = _snapshot(user)
        argv = base + ["--class-names", user / "names.txt", "-o", user / "hl.json"]
    elif case == "hardlink_frame":
        os.link(frames / "00002.jpg", user / "out.json")
        before = _snapshot(user)
        argv = base + ["-o", user / "out.json"]
    else:  # overlay_on_input
        video = user / "clip.mp4"
        video.write_bytes(b"\x00" * 100)
        before = _snapshot(user)
        argv = [b, video, "-o", user / "r.json", "--overlay", video]
    rc, err = _run(argv, capsys)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nothing was changed" in lines[0], err
    assert _snapshot(user) == before


def test_check_outputs_rule_directly(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    f = d / "a.bin"
    f.write_bytes(b"x")
    check_outputs([("-o", tmp_path / "ok.json")], [("in", d)])            # beside: fine
    with pytest.raises(OutputRefused, match="contains"):
        check_outputs([("--output", tmp_path)], [("--checkpoint", f)], folders=("--output",))
    with pytest.raises(OutputRefused, match="also the"):
        check_outputs([("-o", tmp_path / "x"), ("--overlay", tmp_path / "x")], [])
    (tmp_path / "ln").symlink_to(d)
    with pytest.raises(OutputRefused, match="is inside"):
        check_outputs([("-o", tmp_path / "ln" / "new.json")], [("in", d)])


# ------------------------------------------------------------------------------ export
def _tiny_export(model_and_cfg, out, **kw):
    from dvis_trt.export.onnx_export import export_bundle
    model, cfg = model_and_cfg
    return export_bundle(model, cfg, out, window=1, example_size=(64, 64),
                         stages=["mask_head"], **kw)


@pytest.fixture(scope="module")
def model_and_cfg(tiny_eager):
    from dvis_trt.export.config import load_config
    from tests.conftest import TINY_CONFIG
    return tiny_eager, load_config(TINY_CONFIG)


def test_export_refuses_foreign_folder_with_manifest(model_and_cfg, tmp_path):
    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
    (app / "src" / "index.js").write_text("console.log('hi')")
    before = _snapshot(app)
    with pytest.raises(OutputRefused, match="not a dvis-trt bundle"):
        _tiny_export(model_and_cfg, app)
    assert _snapshot(app) == before
    # a marker file of another format is not ours either
    (app / BUNDLE_MARKER).write_text('{"format": "something-else", "entries": ["src"]}')
    before = _snapshot(app)
    with pytest.raises(OutputRefused, match="not a dvis-trt bundle"):
        _tiny_export(model_and_cfg, app)
    assert _snapshot(app) == before


def test_export_into_checkpoint_folder_refused(tiny_checkpoint, tmp_path):
    from dvis_trt.export.onnx_export import export_from_checkpoint
    from tests.conftest import TINY_CONFIG
    d = tmp_path / "run1"
    d.mkdir()
    ck = d / "model_final.pth"
    shutil.copy(tiny_checkpoint, ck)
    (d / "engines").mkdir()
    (d / "engines" / "mine.engine").write_bytes(b"user engine")
    before = _snapshot(d)
    for out in (d, d / ".."):
        with pytest.raises(OutputRefused):
            export_from_checkpoint(TINY_CONFIG, ck, out)
        assert _snapshot(d) == before


def test_reexport_keeps_user_files_and_deletes_only_ours(model_and_cfg, tmp_path):
    out = tmp_path / "b"
    _tiny_export(model_and_cfg, out)
    ours = read_marker(out)
    assert {"manifest.json", "mask_head.onnx", BUNDLE_MARKER} <= ours
    assert json.loads((out / BUNDLE_MARKER).read_text())["format"] == MARKER_FORMAT
    (out / "notes.txt").write_text("my notes")
    (out / "model_final.pth").write_bytes(b"weights")
    (out / "old_stage.onnx").write_bytes(b"ours? no: not listed")
    _tiny_export(model_and_cfg, out, opset=18)
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "model_final.pth").read_bytes() == b"weights"
    assert (out / "old_stage.onnx").exists()
    from dvis_trt.runtime.bundle import load_manifest
    assert load_manifest(out, require_stages=["mask_head"]).producer["opset"] == 18
    assert [p.name for p in tmp_path.iterdir()] == ["b"]          # no temporaries left
    # an entry of ours that the new export no longer writes goes; a clash with a user's file
    # of a name we write is refused
    write_marker(out, [*read_marker(out), "refiner.onnx"])
    (out / "refiner.onnx").write_bytes(b"stale")
    _tiny_export(model_and_cfg, out)
    assert not (out / "refiner.onnx").exists() and (out / "notes.txt").exists()


def test_commit_folder_refuses_clash_with_foreign_entry(tmp_path):
    dest, new = tmp_path / "d", tmp_path / "n"
    dest.mkdir()
    new.mkdir()
    write_marker(dest, ["a.onnx"])
    (dest / "a.onnx").write_bytes(b"old")
    (dest / "b.onnx").write_bytes(b"user's")
    (new / "a.onnx").write_bytes(b"new")
    (new / "b.onnx").write_bytes(b"new")
    with pytest.raises(OutputRefused, match="b.onnx"):
        commit_folder(new, dest, owned_entries(dest))
    assert (dest / "b.onnx").read_bytes() == b"user's" and (dest / "a.onnx").read_bytes() == b"old"


def test_demo_and_build_and_bench_check_outputs(tmp_path, capsys):
    # demo refuses a non-empty folder that is not a demo folder of ours
    d = tmp_path / "mine"
    d.mkdir()
    (d / "demo.mp4").write_bytes(b"my holiday video")
    rc = main(["demo", "--output-dir", str(d), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a dvis-trt bundle" in err
    assert (d / "demo.mp4").read_bytes() == b"my holiday video"
    # bench: an output that is the video it measures
    v = tmp_path / "v.mp4"
    v.write_bytes(b"video")
    rc = main(["bench", "--bundle", str(tmp_path), "--video", str(v), "--json", str(v)])
    assert rc == 2 and "--json" in capsys.readouterr().err and v.read_bytes() == b"video"


# ------------------------------------------------------------------------------ temporaries
def test_temp_names_fit_name_max_and_are_recognisable(tmp_path):
    long = tmp_path / ("ü" * 120 + ".mp4")           # 240 bytes + suffix
    t = temp_path(long)
    assert len(t.name.encode()) <= NAME_MAX and t.suffix == ".mp4"
    assert t.name.startswith(".") and "dvis-trt-tmp" in t.name
    assert parse_temp_name(t.name) == os.getpid()
    t.write_bytes(b"x")                                # the file system takes the name
    assert parse_temp_name(".holiday.mp4") is None


def test_killed_runs_temporaries_are_cleaned(tmp_path):
    # a process that wrote a temporary and was killed before renaming it
    code = ("import sys, os, signal; sys.path.insert(0, %r)\n"
            "from dvis_trt.outputs import temp_path\n"
            "p = temp_path(%r); p.write_bytes(b'half an overlay'); print(p, flush=True)\n"
            "d = temp_path(%r, keep_suffix=False); d.mkdir(); (d / 'x.onnx').write_bytes(b'x')\n"
            "print(d, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n"
            % (str(Path(__file__).resolve().parents[1]), str(tmp_path / "overlay.mp4"),
               str(tmp_path / "bundle")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9
    left = [Path(x) for x in proc.stdout.split()]
    assert all(p.exists() for p in left)
    mine = temp_path(tmp_path / "results.json")        # this process is alive: kept
    mine.write_bytes(b"in progress")
    user = tmp_path / ".overlay.mp4.swp"
    user.write_bytes(b"user's")
    assert clean_stale_temps(tmp_path) == []           # too fresh: could be another container's
    old = 1_000_000_000
    for p in (*left, mine, user):
        os.utime(p, (old, old))
    os.utime(left[1] / "x.onnx", (old, old))
    assert sorted(clean_stale_temps(tmp_path)) == sorted(left)
    assert mine.exists() and user.read_bytes() == b"user's"


def test_run_cleans_a_killed_runs_temporaries(user, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".results.json.dvis-trt-tmp-999999999-0123abcd.json"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (1e9, 1e9))
    rc, err = _run([user / "bundle", user / "frames", "-o", out / "results.json"], capsys)
    assert rc == 0, err
    assert not stale.exists() and (out / "results.json").is_file()


def test_run_never_writes_over_a_file_it_did_not_write(user, tmp_path, capsys):
    b, frames = user / "bundle", user / "frames"
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    video = tmp_path / "holiday.mp4"
    video.write_bytes(b"not ours" * 100)
    for argv in (["-o", mine], ["-o", tmp_path / "r.json", "--overlay", video]):
        rc, err = _run([b, frames, *argv], capsys)
        assert rc == 2 and "was not written by dvis-trt" in err and len(err.splitlines()) == 1
    assert mine.read_text() == '{"my": "notes"}' and video.read_bytes() == b"not ours" * 100
    # our own outputs are replaced by a re-run
    out, ov = tmp_path / "r.json", tmp_path / "ov.mp4"
    for _ in range(2):
        rc, err = _run([b, frames, "-o", out, "--overlay", ov, "--no-resume"], capsys)
        assert rc == 0, err


def test_owned_entries_names_a_symlinked_folder_as_a_link(tmp_path):
    real = tmp_path / "bundle"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputRefused, match="is a symbolic link"):
        owned_entries(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="exists and is not a folder"):
        owned_entries(tmp_path / "file")


def test_atomic_write_to_a_fifo_writes_through_and_keeps_the_node(tmp_path):
    """``--json /dev/null`` and the like: a device / FIFO path gets the bytes; the node itself
    is not replaced by a regular file (a rename over /dev/null would replace the device)."""
    import os
    import stat
    import threading

    from dvis_trt.fileio import atomic_write_json

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write_json(fifo, {"a": 1})
    reader.join(timeout=10)
    assert got == [b'{"a": 1}']
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary left here
