"""Every shell block of the README runs, as written, from a temporary folder.

A stale path, a renamed option or a command that needs a file the README does not mention
fails here. Rules (for whoever edits the README):

* Fenced blocks marked ``bash``, ``sh``, ``shell`` or ``console`` are run, command by command, in
  an empty temporary folder (``dvis-trt ...`` through the CLI's ``main`` in this process, the
  console script's own entry point; anything else with ``bash -e``) that holds only the files the README's commands name as the user's
  own: ``model_final.pth`` (the tiny test checkpoint, standing in for a trained R50), ``video.mp4``
  (a short real MP4) and ``valid.json`` + ``valid/JPEGImages/`` (a one-video YouTube-VIS set).
  ``dvis-trt`` is the one installed next to this Python; the user cache is a temporary folder.
* A block that cannot run here (GPU only, a cluster, full-size files) carries an explicit marker
  on the line right before its fence, with the reason::

      <!-- readme-test: skip (GPU only: needs TensorRT) -->

  Any other fenced block that contains a ``dvis-trt`` command must be a runnable shell block or
  carry that marker (the test fails otherwise), so new commands cannot slip past unchecked.
* Substitutions, so the run takes seconds (each listed here and nowhere else):
  - ``pip install ...`` and ``python -m pytest ...`` segments are dropped (this *is* the
    installed package and the test suite);
  - ``--config r50-ovis`` becomes ``--config tiny`` (the R50 export takes minutes on a CPU);
  - ``dvis-trt demo`` gets ``--frames 4``;
  - ``dvis-trt check`` gets ``--frames 1 --tracks 1 --size 96x160`` (smaller sample inputs);
  - ``dvis-trt bench`` gets quick-mode flags (one round, no per-stage runs, a tiny GEMM probe).
* After the blocks ran, the folder holds only what the commands were told to write (the demo
  writes into the user cache, never into the current folder).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELLS = ("bash", "sh", "shell", "console")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->")
SUBSTITUTIONS = [
    (re.compile(r"--config\s+r50-ovis\b"), "--config tiny"),
    (re.compile(r"^(dvis-trt\s+demo\b.*)$"), r"\1 --frames 4"),
    (re.compile(r"^(dvis-trt\s+check\b.*)$"), r"\1 --frames 1 --tracks 1 --size 96x160"),
    (re.compile(r"^(dvis-trt\s+bench\b.*)$"),
     r"\1 --frames 4 --warmup 1 --repeats 1 --no-stages --no-flops --gemm-seconds 0.05 "
     r"--gemm-sizes 64 --memory off --quiet"),
]
DROP = (re.compile(r"^pip\s+install\b"), re.compile(r"^python\s+-m\s+pytest\b"))


def readme_blocks(text: str):
    """(language, code, skip reason or None, line number) of every fenced block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```\s*(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.search(prev)
        blocks.append((lang, "\n".join(lines[start + 1:j]), skip.group("why") if skip else None,
                       start + 1))
        i = j + 1
    return blocks


def commands(code: str):
    """Logical commands of a block (``\\`` continuations joined), substituted."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kept = []
        for seg in (s.strip() for s in line.split("&&")):
            if any(d.match(seg) for d in DROP):
                continue
            for pat, rep in SUBSTITUTIONS:
                seg = pat.sub(rep, seg)
            kept.append(seg)
        if kept:
            out.append(" && ".join(kept))
    return out


def test_readme_blocks_are_runnable_or_marked():
    blocks = readme_blocks(README.read_text())
    runnable = [b for b in blocks if b[0] in SHELLS and b[2] is None]
    assert runnable, "the README has no runnable shell block"
    for lang, code, skip, line in blocks:
        if skip is not None:
            assert skip.strip(), f"README line {line}: a skip marker needs a reason"
        elif "dvis-trt " in code and any(ln.strip().startswith("dvis-trt ")
                                         for ln in code.splitlines()):
            assert lang in SHELLS, (f"README line {line}: a block with dvis-trt commands must "
                                    "be ```bash (it is then run) or marked readme-test: skip")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, tiny_checkpoint):
    from PIL import Image
    from dvis_trt.runtime.synthetic import make_demo_video

    d = tmp_path_factory.mktemp("readme_user")
    shutil.copy(tiny_checkpoint, d / "model_final.pth")
    demo = make_demo_video(d / "video.mp4", num_frames=6, size=(96, 160), seed=2)
    frames = d / "valid" / "JPEGImages" / "v1"
    frames.mkdir(parents=True)
    names = []
    for t in range(4):
        Image.fromarray(demo.frames[t]).save(frames / f"{t:05d}.jpg", quality=95)
        names.append(f"v1/{t:05d}.jpg")
    (d / "valid.json").write_text(json.dumps({
        "videos": [{"id": 1, "file_names": names, "height": 96, "width": 160, "length": 4}],
        "categories": [{"id": k + 1, "name": f"c{k + 1}"} for k in range(25)]}))
    return d


def _run_block(cmds, work, env, capsys, monkeypatch):
    """Run the commands of one block; ``dvis-trt`` ones in this process (the console script
    calls the same ``main``; torch is imported once for all), anything else with bash."""
    from dvis_trt.runtime.cli import main

    out = []
    for cmd in cmds:
        words = shlex.split(cmd, comments=True)
        if words and words[0] == "dvis-trt" and "&&" not in words and "|" not in cmd:
            with monkeypatch.context() as m:
                m.chdir(work)
                for k, v in env.items():
                    m.setenv(k, v)
                try:
                    rc = main(words[1:])
                except SystemExit as exc:  # --help / --version
                    rc = exc.code or 0
            o = capsys.readouterr()
            out.append(o.out)
            assert rc == 0, f"`{cmd}` exited {rc}:\n{o.out[-2000:]}\n{o.err[-2000:]}"
        else:
            p = subprocess.run(["bash", "-ec", cmd], cwd=work, env={**os.environ, **env},
                               capture_output=True, text=True, timeout=600)
            out.append(p.stdout)
            assert p.returncode == 0, f"`{cmd}` exited {p.returncode}:\n{p.stderr[-3000:]}"
    return "".join(out)


def test_every_readme_command_runs_from_a_temporary_folder(user_files, tmp_path, capsys,
                                                           monkeypatch):
    work = tmp_path / "cwd"
    shutil.copytree(user_files, work)
    before = {p.relative_to(work) for p in work.rglob("*")}
    env = {"DVIS_TRT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran, stdout = 0, ""
    for lang, code, skip, line in readme_blocks(README.read_text()):
        if lang not in SHELLS or skip is not None:
            continue
        cmds = commands(code)
        stdout += _run_block(cmds, work, env, capsys, monkeypatch)
        ran += len(cmds)
    assert ran >= 5
    # the demo names its folder first, writes into the (temporary) user cache, not here
    demo = tmp_path / "cache" / "demo" / "tiny-seed6"
    assert f"demo folder: {demo}" in stdout and "RANDOM" in stdout
    for name in ("results.json", "overlay.mp4", "demo.mp4", "random_tiny_seed6.pth",
                 "bundle_tiny/manifest.json", "contact_sheet.png"):
        assert (demo / name).is_file(), name
        assert str(demo / name.split("/")[0]) in stdout
    assert "dvis-trt export model_final.pth --config r50-ovis" in stdout  # the next step
    assert "[1/1] demo: 4 frames 333x501" in stdout
    assert "(recorded in the bundle)" in stdout and "within tolerance" in stdout  # check
    assert "on ort (ONNX Runtime: CPUExecutionProvider" in stdout
    results = json.loads((demo / "results.json").read_text())
    assert len(results) == 10 and all(len(r["segmentations"]) == 4 for r in results)
    import av
    with av.open(str(demo / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4
    # everything new here was named by a command (-o / --overlay / --contact-sheet / --out)
    new = {p.parts[0] for p in (set(q.relative_to(work) for q in work.rglob("*")) - before)}
    assert new <= {"bundle", "results.json", "overlay.mp4", "sheet.png", "bench_out",
                   "detections.jsonl", "clips.jsonl", "latency_out"}, new
    assert {"bundle", "results.json", "overlay.mp4", "sheet.png"} <= new
