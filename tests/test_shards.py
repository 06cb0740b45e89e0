"""Per-video shards and resume (``runtime/shards.py`` + the ``run_videos`` hook): every finished
video is committed at once; the merged results file is byte-identical to a plain write; a
second run skips finished videos (only those whose key matches); nothing foreign is touched."""
from __future__ import annotations

import json
import os

import pytest

from dvis_trt.runtime import shards as shards_mod
from dvis_trt.errors import InputError
from dvis_trt.runtime.results import write_results
from dvis_trt.runtime.inputs import discover_inputs
from dvis_trt.runtime.runner import run_videos
from dvis_trt.runtime.shards import MARKER_NAME, ShardStore, shard_folder, video_identity


@pytest.fixture(scope="module")
def short_videos(tmp_path_factory):
    """Three 6-frame 96x128 videos and an unreadable one (second in input order)."""
    from dvis_trt.runtime.synthetic import make_demo_video

    d = tmp_path_factory.mktemp("short")
    paths = []
    for i in range(3):
        make_demo_video(d / f"clip{i}.mp4", num_frames=6, size=(96, 128), seed=10 + i)
        paths.append(d / f"clip{i}.mp4")
    (d / "broken.mp4").write_bytes(b"\x00not a video")
    return [paths[0], d / "broken.mp4", paths[1], paths[2]]


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_merge_is_byte_identical_to_a_plain_write(tmp_path):
    results = [{"video_id": 1, "score": 0.1 + 0.2, "category_id": 3, "track_id": 7,
                "segmentations": [{"size": [2, 3], "counts": "06"}, None]},
               {"video_id": 1, "score": 1e-17, "category_id": 1, "track_id": 1000001,
                "segmentations": [None, {"size": [2, 3], "counts": "a\\b\"é"}]},
               {"video_id": 3, "score": 0.3333333432674408, "category_id": 25, "track_id": 2,
                "segmentations": []}]
    idents = [video_identity(f"v{i}", i, None) for i in (1, 2, 3)]
    with ShardStore(tmp_path / "r.json", "k") as store:
        store.commit(idents[0], results[:2], {})
        store.commit(idents[1], [], {})
        store.commit(idents[2], results[2:], {})
        merged = store.merge(idents)
        empty = store.merge([idents[1]], tmp_path / "empty.json")
    plain = write_results(tmp_path / "plain.json", results)
    assert merged.read_bytes() == plain.read_bytes()
    assert empty.read_bytes() == write_results(tmp_path / "e2.json", []).read_bytes()


def test_finished_videos_are_shards_and_the_folder_goes_when_complete(tiny_runner, short_videos,
                                                                      tmp_path):
    runner = tiny_runner()
    jobs, _ = discover_inputs(short_videos)
    out = tmp_path / "results.json"
    summary = run_videos(runner, jobs, out, resume=False)
    assert summary.exit_code == 2 and [j.name for j, _ in summary.failures] == ["broken"]
    folder = shard_folder(out)
    # one video failed: the shards stay (a rerun only retries the failed one)
    shard_files = [n for n in _files(folder) if n != MARKER_NAME]
    assert len(shard_files) == 3 and MARKER_NAME in _files(folder)
    assert out.read_bytes() == json.dumps(summary.results).encode()
    by_video = {}
    for name in shard_files:
        data = json.loads((folder / name).read_text())
        by_video[data["video"]["name"]] = data
        assert data["summary"]["frames"] == 6 and data["summary"]["line"]
    assert sorted(by_video) == ["clip0", "clip1", "clip2"]
    flat = [r for v in ("clip0", "clip1", "clip2") for r in by_video[v]["results"]]
    assert flat == summary.results and {r["video_id"] for r in flat} == {1, 3, 4}

    # all good videos: results.json written, the shard folder removed, no temporaries left
    out2 = tmp_path / "good.json"
    good, _ = discover_inputs([short_videos[0], short_videos[2]])
    s2 = run_videos(runner, good, out2)
    assert s2.exit_code == 0 and not shard_folder(out2).exists()
    assert _files(tmp_path) == ["good.json", "results.json", "results.json.shards"]


def test_resume_runs_only_the_unfinished_videos(tiny_runner, short_videos, tmp_path,
                                                monkeypatch, capsys):
    runner = tiny_runner()
    jobs, _ = discover_inputs(short_videos)
    ref = run_videos(runner, jobs, tmp_path / "ref.json", resume=False)
    out = tmp_path / "r.json"
    real_commit = ShardStore.commit
    calls = []

    def commit_then_interrupt(self, *a, **kw):
        path = real_commit(self, *a, **kw)
        calls.append(path)
        raise KeyboardInterrupt  # Ctrl-C right after the first video was committed

    monkeypatch.setattr(ShardStore, "commit", commit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_videos(runner, jobs, out)
    monkeypatch.setattr(ShardStore, "commit", real_commit)
    assert len(calls) == 1 and not out.exists()
    assert "1 finished video(s) are kept" in capsys.readouterr().err
    assert not [n for n in _files(shard_folder(out)) if ".tmp" in n]

    ran = []
    real_run = runner.run_source
    monkeypatch.setattr(runner, "run_source",
                        lambda job, *a, **kw: ran.append(job.name) or real_run(job, *a, **kw))
    runner.quiet = False
    try:
        again = run_videos(runner, jobs, out)
    finally:
        runner.quiet = True
    said = capsys.readouterr().out
    assert "resume: 1 of 4 video(s) already finished" in said
    assert ran == ["clip1", "clip2"]  # clip0 was skipped; broken is retried (and fails again)
    assert again.exit_code == ref.exit_code == 2
    assert out.read_bytes() == (tmp_path / "ref.json").read_bytes()

    # --no-resume runs everything again; same bytes
    ran.clear()
    run_videos(runner, jobs, out, resume=False)
    assert ran == ["clip0", "clip1", "clip2"]
    assert out.read_bytes() == (tmp_path / "ref.json").read_bytes()


def test_shards_of_other_options_or_changed_videos_are_not_reused(tiny_runner, short_videos,
                                                                  tmp_path, monkeypatch, capsys):
    runner = tiny_runner()
    jobs, _ = discover_inputs(short_videos[2:])
    out = tmp_path / "r.json"
    folder = shard_folder(out)
    folder.mkdir()
    (folder / MARKER_NAME).write_text("{}")
    key = runner.shard_key(lenient=False)
    idents = [video_identity(j.name, j.video_id, j.path) for j in jobs]
    with ShardStore(out, runner.shard_key(lenient=True)) as store:  # other options
        store.commit(idents[0], [{"video_id": 1, "stale": True}], {})
    stale_video = dict(idents[1], size=idents[1]["size"] + 1)  # the file changed since
    with ShardStore(out, key) as store:
        p = store.commit(stale_video, [{"video_id": 2, "stale": True}], {})
    assert p == store.shard_path(idents[1])  # same video -> same file, replaced when redone
    ran = []
    real_run = runner.run_source
    monkeypatch.setattr(runner, "run_source",
                        lambda job, *a, **kw: ran.append(job.name) or real_run(job, *a, **kw))
    runner.quiet = False
    try:
        summary = run_videos(runner, jobs, out, key_options={"lenient": False})
    finally:
        runner.quiet = True
    said = capsys.readouterr().out
    assert ran == ["clip1", "clip2"]
    assert "1 shard(s) from another bundle/options redone" in said
    assert "1 shard(s) of changed videos redone" in said
    assert not any(r.get("stale") for r in json.loads(out.read_text()))
    assert summary.exit_code == 0 and not folder.exists()


def test_foreign_folder_and_concurrent_runs_are_refused(tmp_path):
    out = tmp_path / "r.json"
    shard_folder(out).mkdir()
    (shard_folder(out) / "mine.txt").write_text("user data")
    with pytest.raises(InputError, match="not a dvis-trt shard folder"):
        ShardStore(out, "k")
    assert _files(shard_folder(out)) == ["mine.txt"]

    out2 = tmp_path / "s.json"
    with ShardStore(out2, "k") as store:
        if os.name == "posix":
            with pytest.raises(InputError, match="another dvis-trt run"):
                ShardStore(out2, "k")
        # a temporary a killed run left behind is removed by the next run, foreign files stay
        (store.folder / ".000001-a-00000000.json.deadbeef.tmp.json").write_text("{")
        (store.folder / "notes.txt").write_text("x")
    with ShardStore(out2, "k") as store:
        assert _files(store.folder) == [MARKER_NAME, "notes.txt"]
        assert store.remove() is False  # foreign file: the folder stays
    assert _files(shard_folder(out2)) == [MARKER_NAME, "notes.txt"]


def test_a_failed_single_video_leaves_no_shard_folder(tiny_runner, short_videos, tmp_path):
    jobs, _ = discover_inputs([short_videos[1]])
    out = tmp_path / "r.json"
    with pytest.raises(InputError):
        run_videos(tiny_runner(), jobs, out)
    assert _files(tmp_path) == []
    assert shards_mod.SHARDS_SUFFIX == ".shards"
