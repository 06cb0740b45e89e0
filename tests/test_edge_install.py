"""The edge install explains itself: with torch / onnx / TensorRT not importable (a meta_path
finder refuses them in a subprocess), every command that needs one says which extra to install
in one line, and `bench --backends ort` and `run` still work."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: what the edge install (`pip install dvis-trt`) lacks
BLOCKED = ("torch", "torchvision", "onnx", "onnxscript", "onnx_graphsurgeon", "tensorrt",
           "polygraphy")

_PRELUDE = textwrap.dedent(f"""
    import os, sys
    BLOCKED = {BLOCKED!r} + tuple(filter(None, os.environ.get("BLOCK_MORE", "").split(",")))

    class _Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Refuse())
    from dvis_trt.runtime.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def edge(*argv, cwd=None, more=()):
    """Run ``dvis-trt *argv`` with the heavy extras (and ``more``) unimportable;
    (rc, stdout, stderr)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", BLOCK_MORE=",".join(more))
    p = subprocess.run([sys.executable, "-c", _PRELUDE, *map(str, argv)], capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edge")
    (d / "model.pth").write_bytes(b"\0" * 8)
    bundle = d / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    return d


@pytest.mark.parametrize("argv,extra", [
    (["export", "{d}/model.pth", "--config", "r50-ovis", "-o", "{d}/out"], "export"),
    (["check", "{d}/bundle", "--checkpoint", "{d}/model.pth"], "export"),
    (["demo", "--out", "{d}/demo"], "export"),
    (["build", "{d}/bundle"], "engine"),
])
def test_commands_needing_an_extra_say_which_in_one_line(files, argv, extra):
    rc, out, err = edge(*[a.format(d=files) for a in argv], cwd=files)
    line = _one_line(err)
    assert rc != 0 and "Traceback" not in err and "internal error" not in err
    assert line.startswith("dvis-trt: error: ") and f"pip install 'dvis-trt[{extra}]'" in line \
        or (extra == "engine" and "TensorRT" in line), line


def test_bench_without_its_extra_says_so_before_any_work(files):
    (files / "v.mp4").write_bytes(b"\0")
    rc, out, err = edge("bench", files / "bundle", files / "v.mp4", "--backends", "ort",
                        cwd=files, more=("psutil", "matplotlib"))
    line = _one_line(err)
    assert rc == 3 and "pip install 'dvis-trt[bench]'" in line and not out.strip(), line


def test_help_and_configs_work_without_torch(files):
    from dvis_trt.runtime.cli import COMMANDS
    for command in COMMANDS:  # every command's --help, including ones added later
        rc, out, err = edge(command, "--help", cwd=files)
        assert (rc == 0 and "usage: dvis-trt" in out) or \
            (rc == 3 and "pip install 'dvis-trt[" in _one_line(err)), (command, err)
    rc, out, err = edge("configs", cwd=files)
    assert rc == 0 and "r50-ovis" in out, err


def test_run_and_ort_bench_without_torch(tiny_bundle, demo_mp4, tmp_path):
    """`bench --backends ort` times ONNX Runtime with no torch (no eager baseline, said so)."""
    pytest.importorskip("matplotlib")
    rc, out, err = edge("bench", tiny_bundle, demo_mp4.path, "--backends", "ort", "--frames", "4",
                        "--warmup", "1", "--repeats", "1", "--no-stages", "--gemm-seconds",
                        "0.05", "--gemm-sizes", "64", "--memory", "off", "--out", tmp_path / "b",
                        cwd=tmp_path)
    assert rc == 0, err
    assert "ort:" in out and "FPS" in out
    assert "pip install 'dvis-trt[export]'" in out  # why there is no baseline
    rc, out, err = edge("run", tiny_bundle, demo_mp4.path, "-o", tmp_path / "r.json", "--quiet",
                        cwd=tmp_path)
    assert rc == 0, err
    assert (tmp_path / "r.json").is_file()
