"""``dvis-trt run --ray``: a local Ray cluster (2 CPUs, started once for this module), two actors,
the tiny bundle. The merged results equal the local run's byte for byte; a worker that dies
while it holds a video is replaced and the video retried; an interrupted run resumes.

Each Ray run costs a few seconds (actor start-up + loading the bundle); Ray is started once."""
from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from dvis_trt.runtime.cli import main  # noqa: E402
from dvis_trt.runtime.ray_inputs import TEST_EXIT_ENV, split_address  # noqa: E402
from dvis_trt.runtime.shards import MARKER_NAME, ShardStore, shard_folder  # noqa: E402

RAY = ["--ray", "--workers", "2", "--ray-cpus-per-worker", "1", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local cluster for the module: 2 CPUs (the CI machine), no dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_bundle):
    """Three short videos, the second unreadable, and the local run's results file."""
    from dvis_trt.runtime.synthetic import make_demo_video

    d = tmp_path_factory.mktemp("coll")
    videos = []
    for i, name in enumerate(["clip0", "broken", "clip1"]):
        p = d / f"{name}.mp4"
        if name == "broken":
            p.write_bytes(b"\x00\x01 not a video")
        else:
            make_demo_video(p, num_frames=6, size=(96, 128), seed=20 + i)
        videos.append(p)
    ref = d / "local.json"
    rc = main(["run", str(tiny_bundle), *map(str, videos), "-o", str(ref), "--threads", "1",
               "--quiet"])
    assert rc == 2 and ref.is_file()
    return videos, ref, rc


def _run(args, capsys):
    rc = main(["run", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _all_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_ray_results_equal_the_local_run_byte_for_byte(tiny_bundle, collection, tmp_path,
                                                       capsys):
    videos, ref, ref_rc = collection
    out = tmp_path / "r.json"
    # the third video as a URI: read through pyarrow's filesystem by the worker (as s3://)
    inputs = [videos[0], videos[1], f"file://{videos[2]}"]
    rc, said, err = _run([tiny_bundle, *inputs, "-o", out, *RAY], capsys)
    assert rc == ref_rc == 2, err
    assert out.read_bytes() == ref.read_bytes()
    assert err.count("skipped [2/3] broken") == 1  # reported once
    assert "1 of 3 videos were skipped: broken" in err
    assert "2 worker(s) x (1 CPU, 0 GPU, 1 thread(s))" in said
    workers = [ln for ln in said.splitlines() if ln.startswith("worker ")]
    assert 1 <= len(workers) <= 2 and sum(int(ln.split(": ")[1].split()[0]) for ln in workers) == 2
    assert {r["video_id"] for r in json.loads(out.read_text())} == {1, 3}


def test_a_worker_killed_mid_video_is_replaced_and_the_video_retried(
        tiny_bundle, collection, tmp_path, capsys, monkeypatch):
    videos, ref, ref_rc = collection
    hook = tmp_path / "hook"
    hook.mkdir()
    monkeypatch.setenv(TEST_EXIT_ENV, f"clip1:{hook}")
    out_dir = tmp_path / "out"
    out = out_dir / "r.json"
    rc, said, err = _run([tiny_bundle, *videos, "-o", out, *RAY], capsys)
    assert rc == ref_rc, err
    assert (hook / "clip1.exited").is_file()  # the actor really died holding clip1
    attempts = [ln.split()[0] for ln in (hook / "attempts.log").read_text().splitlines()]
    assert sorted(attempts) == ["broken", "clip0", "clip1", "clip1"]
    assert "retried after a worker died: clip1 (2 attempts)" in said
    # every video exactly once, same bytes as the local run, nothing half-written
    assert out.read_bytes() == ref.read_bytes()
    shards = [n for n in _all_files(shard_folder(out)) if n != MARKER_NAME]
    assert len(shards) == 2 and len({n.split("-")[1] for n in shards}) == 2
    assert _all_files(out_dir) == ["r.json", "r.json.shards"] + \
        [f"r.json.shards/{n}" for n in sorted([MARKER_NAME] + shards)]


def test_an_interrupted_ray_run_resumes_with_the_remaining_videos(
        tiny_bundle, collection, tmp_path, capsys, monkeypatch):
    videos, ref, _ = collection
    hook = tmp_path / "hook"
    hook.mkdir()
    monkeypatch.setenv(TEST_EXIT_ENV, f"-:{hook}")  # log attempts, never exit
    good = [videos[0], videos[2]]
    out = tmp_path / "r.json"
    real_commit = ShardStore.commit

    def commit_then_interrupt(self, *a, **kw):
        real_commit(self, *a, **kw)
        raise KeyboardInterrupt  # Ctrl-C right after the first shard

    monkeypatch.setattr(ShardStore, "commit", commit_then_interrupt)
    rc, _, err = _run([tiny_bundle, *good, "-o", out, *RAY], capsys)
    monkeypatch.setattr(ShardStore, "commit", real_commit)
    assert rc == 130 and not out.exists()
    assert "1 finished video(s) are kept" in err
    (done,) = [n for n in _all_files(shard_folder(out)) if n != MARKER_NAME]
    first = json.loads((shard_folder(out) / done).read_text())["video"]["name"]
    (hook / "attempts.log").unlink()

    rc, said, err = _run([tiny_bundle, *good, "-o", out, *RAY], capsys)
    assert rc == 0, err
    assert "resume: 1 of 2 video(s) already finished" in said
    ran = [ln.split()[0] for ln in (hook / "attempts.log").read_text().splitlines()]
    assert ran == [{"clip0", "clip1"}.difference({first}).pop()]
    assert not shard_folder(out).exists()  # complete: the shard folder is gone
    want = json.loads(ref.read_text())  # the local run of all three: clip1 was video 3
    for r in want:
        r["video_id"] = {1: 1, 3: 2}[r["video_id"]]
    assert out.read_bytes() == json.dumps(want).encode()


def test_ray_address_does_not_swallow_an_input():
    assert split_address("auto", ["a.mp4"]) == ("auto", ["a.mp4"])
    assert split_address("10.0.0.1:6379", []) == ("10.0.0.1:6379", [])
    assert split_address("ray://head:10001", ["x"]) == ("ray://head:10001", ["x"])
    assert split_address("clip.mp4", ["b.mp4"]) == ("auto", ["clip.mp4", "b.mp4"])


def test_without_ray_the_option_says_what_to_install(tiny_bundle, collection, tmp_path, capsys,
                                                     monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    rc, _, err = _run([tiny_bundle, collection[0][0], "-o", tmp_path / "r.json", "--ray"],
                      capsys)
    assert rc == 2 and err.strip().count("\n") == 0
    assert "pip install 'dvis-trt[ray]'" in err
    rc, _, err = _run([tiny_bundle, collection[0][0], "--workers", "2"], capsys)
    assert rc == 2 and "add --ray" in err


def test_worker_retries_a_stage_error_once_then_fails_only_that_video():
    """The actor's per-video contract without a cluster: an InputError is a bad video (no
    retry), a stage error is retried once on the same actor, a repeating one fails the video
    with the exit code the local CLI would give."""
    from types import SimpleNamespace

    from dvis_trt.errors import InputError
    from dvis_trt.runtime.ray_worker import VideoWorker
    from dvis_trt.runtime.inputs import VideoJob

    class FakeRunner:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def run_source(self, job, source, overlay):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return SimpleNamespace(results=[{"video_id": job.video_id, "score": 0.5}],
                                   result=SimpleNamespace(num_frames=3),
                                   summary=lambda line: {"line": line})

        def summary_line(self, out, i, n):
            return f"[{i + 1}/{n}] ok"

    def worker(errors):
        w = VideoWorker.__new__(VideoWorker)
        w.spec, w.worker, w.init_error = {"total": 1, "strict": True, "stage_retries": 1}, "h:1", None
        w.jobs = [VideoJob(name="v", video_id=1, path=None, opener=lambda: None)]
        w.runner = FakeRunner(errors)
        return w

    row = {"index": 0, "name": "v", "video_id": 7, "path": "", "uri": "", "local_pos": 0,
           "overlay": ""}
    w = worker([RuntimeError("CUDA error")])
    out = w._run_one(row)
    assert out["status"] == "ok" and w.runner.calls == 2 and out["frames"] == 3
    assert json.loads(out["results"]) == [{"video_id": 7, "score": 0.5}]
    w = worker([RuntimeError("bad op"), RuntimeError("bad op")])
    out = w._run_one(row)
    assert (out["status"], out["exit_code"], w.runner.calls) == ("error", 70, 2)
    assert out["message"] == "RuntimeError: bad op"
    w = worker([InputError("no frames")])
    out = w._run_one(row)
    assert (out["status"], out["message"], w.runner.calls) == ("bad_input", "no frames", 1)
    w = worker([MemoryError(), MemoryError()])
    assert w._run_one(row)["exit_code"] == 3


def test_resources_map_onto_actors():
    from dvis_trt.runtime.ray_runner import RayOptions, plan_workers

    assert plan_workers(RayOptions(), {"CPU": 64.0, "GPU": 8.0}) == (8, 4.0, 1.0)
    assert plan_workers(RayOptions(gpus_per_worker=0.25), {"CPU": 64.0, "GPU": 8.0}) == \
        (32, 2.0, 0.25)
    assert plan_workers(RayOptions(), {"CPU": 2.0}) == (1, 2.0, 0.0)
    assert plan_workers(RayOptions(), {"CPU": 16.0}) == (4, 4.0, 0.0)
    assert plan_workers(RayOptions(workers=2), {"CPU": 2.0}) == (2, 1.0, 0.0)
    assert plan_workers(RayOptions(workers=3, cpus_per_worker=1.5), {"CPU": 2.0}) == \
        (3, 1.5, 0.0)


def test_local_and_ray_runs_share_shard_keys(tiny_runner, tiny_bundle):
    """A local run and a --ray run with the same options can resume each other's shards."""
    from dvis_trt.runtime.cli import build_parser
    from dvis_trt.runtime.ray_runner import shard_key_of_args

    runner = tiny_runner()  # ort, providers cpu, window 5, one clip
    args = build_parser(only="run").parse_args(
        ["run", str(tiny_bundle), "x.mp4", "--backend", "ort", "--providers", "cpu",
         "--clip-frames", "0", "--ray"])
    assert shard_key_of_args(args, tiny_bundle, None) == runner.shard_key(lenient=False)
    args.window = 3
    assert shard_key_of_args(args, tiny_bundle, None) != runner.shard_key(lenient=False)
