"""A folder of video files is a collection: one video per file (what `run DIR` and `--ray DIR`
take, README "A collection on a cluster")."""
from __future__ import annotations

import numpy as np

from dvis_trt.runtime.inputs import discover_inputs
from dvis_trt.runtime.synthetic import encode_frames


def test_folder_of_videos_gives_one_job_per_video_file(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("clip10.mp4", 3), ("clip2.MKV", 2)):
        encode_frames(tmp_path / name, rng.integers(0, 255, (n, 16, 24, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / ".hidden.mp4").write_bytes(b"")
    jobs, cats = discover_inputs([tmp_path])
    assert cats is None
    # natural order (clip2 before clip10), suffix case-insensitive, other files ignored
    assert [j.name for j in jobs] == ["clip2", "clip10"]
    assert [j.path.name for j in jobs] == ["clip2.MKV", "clip10.mp4"]
    src = jobs[1].open()
    try:
        frames = list(src)
    finally:
        getattr(src, "close", lambda: None)()
    assert len(frames) == 3 and frames[0].rgb.shape == (16, 24, 3)
