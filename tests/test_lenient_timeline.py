"""Lenient decoding keeps the timeline: frames lost to damage keep their slots (placed by
timestamps), the results have one entry per frame of the video (null where lost), and the
summary says how many frames were lost and where."""
from __future__ import annotations

import json

import pytest

from dvis_trt.runtime.cli import main
from dvis_trt.runtime.inputs import discover_inputs
from dvis_trt.runtime.synthetic import make_broken_videos
from dvis_trt.runtime.video import open_source


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return make_broken_videos(tmp_path_factory.mktemp("broken"))


def test_lost_frames_keep_their_slots(broken):
    # "corrupt": 20 frames at 10 fps, the packet of frame 10 destroyed
    src = open_source(broken["corrupt"], strict=False)
    frames = list(src.iter_frames())
    slots = [f.index for f in frames]
    assert slots == [i for i in range(20) if i != 10]
    assert all(abs(f.pts_seconds - f.index / 10) < 1e-6 for f in frames)   # index = time slot
    assert src.lost_frames == [(10, 11)] and src.timeline_frames == 20
    # "truncated": the stream breaks off after 11 frames; the container announces 20
    src = open_source(broken["truncated"], strict=False)
    assert [f.index for f in src.iter_frames()] == list(range(11))
    assert src.lost_frames == [(11, 20)] and src.timeline_frames == 20
    # a clean decode is unchanged
    src = open_source(broken["corrupt"], strict=False)
    assert len(list(src.iter_frames())) == 19


def test_results_have_one_entry_per_timeline_frame(tiny_runner, broken):
    jobs, _ = discover_inputs([broken["corrupt"]], strict=False)
    runner = tiny_runner()
    out = runner.run_source(jobs[0], jobs[0].open())
    assert out.timeline_frames == 20 and out.lost_frames == [(10, 11)]
    assert out.result.num_frames == 19                     # what the model saw
    for d, decoded in zip(out.results, out.result.segmentations):
        segs = d["segmentations"]
        assert len(segs) == 20 and segs[10] is None
        assert segs[:10] == decoded[:10] and segs[11:] == decoded[10:]   # aligned by time
    line = runner.summary_line(out)
    assert "1 of 20 frames lost to damage (frames 10" in line


def test_cli_lenient_truncated_writes_full_timeline(tiny_bundle, broken, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["run", str(tiny_bundle), str(broken["truncated"]), "--lenient", "-o", str(out),
               "--no-resume"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(out.read_text())
    assert res and all(len(d["segmentations"]) == 20 for d in res)
    assert all(d["segmentations"][k] is None for d in res for k in range(11, 20))
    assert "9 of 20 frames lost to damage (frames 11-19" in cap.out
