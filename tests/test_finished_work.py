"""Finished work survives: an overlay that fails in a batch costs only itself (every video's
results are written, the exit code says something failed), and a long video name whose
temporary would pass the file-system name limit still gets its overlay."""
from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from PIL import Image

from dvis_trt.runtime import runner as runner_mod
from dvis_trt.runtime.inputs import discover_inputs
from dvis_trt.runtime.runner import run_videos


def _frames(folder, n=3, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("keep_going", [False, True])
def test_overlay_failure_costs_only_itself(tiny_runner, tmp_path, monkeypatch, capsys,
                                           keep_going):
    vids = [_frames(tmp_path / "in" / f"v{i}", seed=i) for i in range(3)]
    jobs, _ = discover_inputs(vids)
    runner = tiny_runner()
    real = runner_mod.Runner.write_overlay
    calls = []

    def flaky(self, out, path):
        calls.append(out.job.name)
        if out.job.name == "v1":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, out, path)

    monkeypatch.setattr(runner_mod.Runner, "write_overlay", flaky)
    out = tmp_path / "out" / "results.json"
    summary = run_videos(runner, jobs, out, str(tmp_path / "ov") + "/", keep_going=keep_going)
    err = capsys.readouterr().err
    assert calls == ["v0", "v1", "v2"]                    # the batch went on
    assert summary.exit_code == 2 and not summary.failures
    assert [j.name for j, _ in summary.secondary_failures] == ["v1"], summary.secondary_failures
    assert "No space left on device" in err and "v1" in err
    written = json.loads(out.read_text())
    assert sorted({d["video_id"] for d in written}) == [1, 2, 3]   # every video's results
    assert (tmp_path / "ov" / "v0.mp4").is_file() and (tmp_path / "ov" / "v2.mp4").is_file()
    assert not (tmp_path / "ov" / "v1.mp4").exists()
    assert not [p for p in (tmp_path / "ov").iterdir() if p.name.startswith(".")]


def test_single_video_overlay_failure_keeps_results(tiny_runner, tmp_path, monkeypatch):
    jobs, _ = discover_inputs([_frames(tmp_path / "v")])

    def fail(self, out, path):
        raise ValueError("no encoder for this container")

    monkeypatch.setattr(runner_mod.Runner, "write_overlay", fail)
    out = tmp_path / "r.json"
    summary = run_videos(tiny_runner(), jobs, out, tmp_path / "o.mp4")
    assert summary.exit_code == 2 and json.loads(out.read_text())


def test_overlay_name_near_the_name_limit(tiny_runner, tmp_path):
    name = "v" * 250                                     # overlay "<name>.mp4": 254 bytes
    jobs, _ = discover_inputs([_frames(tmp_path / name)])
    summary = run_videos(tiny_runner(), jobs, tmp_path / "r.json", str(tmp_path / "ov") + "/")
    assert summary.exit_code == 0
    (written,) = list((tmp_path / "ov").iterdir())
    assert written.name.startswith("v" * 200) and written.stat().st_size > 0


def test_batch_overlay_names_fit_the_name_limit(tmp_path):
    from dvis_trt.outputs import NAME_MAX
    from dvis_trt.runtime.inputs import overlay_paths
    a, b = _frames(tmp_path / ("a" * 250)), _frames(tmp_path / ("a" * 249 + "b"))
    jobs, _ = discover_inputs([a, b])
    for target in (str(tmp_path / "ov") + "/", str(tmp_path / ("o" * 30 + ".mp4"))):
        paths = overlay_paths(target, jobs)
        assert len({p.name for p in paths.values()}) == 2
        assert all(len(p.name.encode()) <= NAME_MAX - 12 for p in paths.values())
