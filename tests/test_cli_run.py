"""``dvis-trt run`` options: ``--clip-frames`` (track ids stable across clip borders), overlay,
class names, backend choice, window invariance, output format and error lines."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest

from dvis_trt.runtime.cli import main
from dvis_trt.runtime.pipeline import FILL_ID_BASE
from dvis_trt.runtime.results import decode_rle
from dvis_trt.runtime.inputs import discover_inputs

torch = pytest.importorskip("torch")


def _run(args, capsys, quiet=True):
    argv = ["run", *map(str, args)]
    if quiet:
        argv.append("--quiet")
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def eager_hub(tiny_eager, demo_frames):
    """The eager oracle's track hub over the whole demo clip (official-style objects)."""
    from dvis_trt.runtime.preprocess import preprocess_frames

    s = tiny_eager.settings
    images, _ = preprocess_frames(demo_frames, s.min_size_test, s.max_size_test, s.pixel_mean,
                                  s.pixel_std, s.size_divisibility)
    with torch.no_grad():
        seg = tiny_eager.run_segmenter(torch.from_numpy(images))
        return tiny_eager.run_tracker(seg)


def _clip_topk_oracle(hub, a: int, b: int, settings) -> list:
    """Tracks the refiner of clip [a, b) must get, from the whole-video hub: tracks with a frame
    in the clip, noise filter on what was seen by the clip's end, ranked by the foreground
    score of the mean of their logits over the clip's frames (birth order breaks ties)."""
    cands = []
    for tid in sorted(hub):
        q = hub[tid]
        first, last = q.start_time, q.start_time + len(q.logits)  # frames [first, last)
        lo, hi = max(first, a), min(last, b)
        if lo >= hi:
            continue
        seen = min(last, b) - first
        if seen < settings.noise_frame_num and first + seen < b:
            continue
        mean = torch.stack(q.logits[lo - first:hi - first]).mean(0)
        score = float(torch.softmax(mean, -1)[:-1].max())
        cands.append((-score, len(cands), tid))
    return [tid for _, _, tid in sorted(cands)[:settings.offline_topk_num]]


@pytest.mark.parametrize("clip_frames", [4, 5])
def test_clip_frames_keeps_track_ids_across_clip_borders(tiny_runner, demo_mp4, eager_hub,
                                                         clip_frames):
    runner = tiny_runner(clip_frames=clip_frames)
    (job,), _ = discover_inputs([demo_mp4.path])
    res = runner.run_source(job, job.open()).result
    t_len = demo_mp4.frames.shape[0]
    starts = list(range(0, t_len, clip_frames))
    assert [c.start for c in res.clips] == starts
    # the tracker state is carried: same sequences, same deterministic ids as one pass
    assert res.num_tracks == len(eager_hub)
    k = runner.settings.offline_topk_num
    for clip in res.clips:
        want = _clip_topk_oracle(eager_hub, clip.start, clip.start + clip.length,
                                 runner.settings)
        got = [int(i) for i in clip.refiner_ids if i < FILL_ID_BASE]
        assert got == want, (clip.start, got, want)
        assert len(clip.refiner_ids) == runner.settings.num_new_ins
        assert len(got) <= k
    # a track selected in several clips keeps its id (one result per (id, label), masks on
    # both sides of the border when the label is the same)
    clips_by_id = {}
    for i, segs in enumerate(res.segmentations):
        present = [t for t, s in enumerate(segs) if s is not None]
        assert present, "every merged instance has at least one clip of masks"
        clips_hit = sorted({t // clip_frames for t in present})
        # masks come per whole clip: every frame of a selected clip has an RLE
        assert present == [t for c in clips_hit for t in range(c * clip_frames,
                                                                min(t_len, (c + 1) * clip_frames))]
        if res.track_ids[i] < FILL_ID_BASE:
            clips_by_id.setdefault(int(res.track_ids[i]), set()).update(clips_hit)
    for tid, hit in clips_by_id.items():
        q = eager_hub[tid]
        # the id names the same sequence in every clip: it is alive in each of them
        for c in hit:
            assert q.start_time < (c + 1) * clip_frames and \
                q.start_time + len(q.logits) > c * clip_frames, (tid, c)
    spanning = [tid for tid, hit in clips_by_id.items() if len(hit) > 1]
    assert spanning, "no track id crossed a clip border; the test clip does not test this"
    # fill queries (frame link) belong to one clip: their instances never span a border
    for i, segs in enumerate(res.segmentations):
        if res.track_ids[i] >= FILL_ID_BASE:
            present = [t for t, s in enumerate(segs) if s is not None]
            assert len({t // clip_frames for t in present}) == 1


def test_clip_frames_results_json_has_null_frames(tiny_bundle, demo_mp4, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc, _, err = _run([tiny_bundle, demo_mp4.path, "-o", out, "--clip-frames", "8",
                       "--threads", "2"], capsys)
    assert rc == 0, err
    results = json.loads(out.read_text())
    t_len = demo_mp4.frames.shape[0]
    assert all(len(r["segmentations"]) == t_len for r in results)
    assert any(s is None for r in results for s in r["segmentations"])
    for r in results:  # None exactly on whole clips
        flags = [s is not None for s in r["segmentations"]]
        for c in range(0, t_len, 8):
            assert len(set(flags[c:c + 8])) == 1


def test_output_format_summary_and_overlay(tiny_bundle, demo_mp4, tmp_path, capsys):
    out, ov = tmp_path / "sub" / "r.json", tmp_path / "ov.mp4"
    rc, stdout, err = _run([tiny_bundle, demo_mp4.path, "-o", out, "--overlay", ov,
                            "--overlay-min-score", "0", "--threads", "2"], capsys, quiet=False)
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("backend: ort (ONNX Runtime: CPUExecutionProvider, 2 threads)")
    assert "auto; not TensorRT" in lines[0]
    summary = [ln for ln in lines if ln.startswith("[1/1] demo:")]
    assert len(summary) == 1 and "20 frames 333x501" in summary[0] and "frames/s" in summary[0]
    results = json.loads(out.read_text())
    assert len(results) == 10  # MAX_NUM of the tiny config
    for r in results:
        assert set(r) == {"video_id", "score", "category_id", "segmentations", "track_id"}
        assert 1 <= r["category_id"] <= 25 and 0 <= r["score"] <= 1
        assert all(isinstance(s["counts"], str) and s["size"] == [333, 501]
                   for s in r["segmentations"])
    # the overlay: every frame, exactly the video's size (odd: yuv444p), masks drawn
    with av.open(str(ov)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 20 and frames[0].shape[:2] == (333, 501)
    from dvis_trt.runtime.video import open_source
    src = [f.rgb for f in open_source(demo_mp4.path).iter_frames()]
    union = decode_rle(results[0]["segmentations"])
    t = int(np.argmax(union.sum((1, 2))))
    inside = np.abs(frames[t][:333, :501].astype(int) - src[t].astype(int)).mean(-1)[union[t]]
    assert inside.mean() > 20  # tinted where the top instance's mask is
    assert list(tmp_path.glob(".*tmp*")) == [] and list((tmp_path / "sub").glob(".*")) == []


def test_class_names_option(tiny_bundle, demo_mp4, tmp_path, capsys):
    names = [f"thing{i}" for i in range(25)]
    f = tmp_path / "names.txt"
    f.write_text("# my classes\n" + "\n".join(names) + "\n")
    rc, stdout, err = _run([tiny_bundle, demo_mp4.path, "-o", tmp_path / "r.json",
                            "--class-names", f], capsys, quiet=False)
    assert rc == 0, err
    summary = next(ln for ln in stdout.splitlines() if ln.startswith("[1/1]"))
    assert "thing" in summary
    rc, stdout, err = _run([tiny_bundle, demo_mp4.path, "-o", tmp_path / "r2.json",
                            "--class-names", "a,b,c"], capsys)
    assert rc == 2 and "3 names but the bundle has 25 classes" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r2.json").exists()


def test_window_does_not_change_results(tiny_runner, demo_frames):
    """``--window`` only batches engine calls (per-frame stages; batch-size-dependent kernels
    may change float rounding, hence IoU/score tolerances rather than equality)."""
    res = {w: tiny_runner(window=w).pipeline.run_video(demo_frames) for w in (1, 5)}
    for w in (1,):
        assert res[w].track_ids.tolist() == res[5].track_ids.tolist()
        assert res[w].labels.tolist() == res[5].labels.tolist()
        np.testing.assert_allclose(res[w].scores, res[5].scores, rtol=0, atol=1e-5)
        for a, b in zip(res[w].segmentations, res[5].segmentations):
            ma, mb = decode_rle(a), decode_rle(b)
            inter, union = (ma & mb).sum((1, 2)), (ma | mb).sum((1, 2))
            assert np.where(union > 0, inter / np.maximum(union, 1), 1).min() >= 0.999


def test_several_videos_get_one_overlay_each(tiny_bundle, demo_mp4, tmp_path, capsys):
    import shutil
    other = tmp_path / "other.mkv"
    shutil.copy(demo_mp4.path, tmp_path / "first.mp4")
    from dvis_trt.runtime.synthetic import make_demo_video
    make_demo_video(other, num_frames=4, size=(64, 96), seed=3)
    rc, _, err = _run([tiny_bundle, tmp_path / "first.mp4", other, "-o", tmp_path / "r.json",
                       "--overlay", tmp_path / "ov.mp4"], capsys)
    assert rc == 0, err
    assert (tmp_path / "ov_first.mp4").is_file() and (tmp_path / "ov_other.mp4").is_file()
    results = json.loads((tmp_path / "r.json").read_text())
    assert sorted({r["video_id"] for r in results}) == [1, 2]


@pytest.mark.parametrize("extra,words", [
    (["--backend", "torch", "--checkpoint", "missing.pth"], "missing.pth"),
    (["--ytvis-json", "x.json"], "--ytvis-json and --ytvis-root go together"),
    (["--class-names", "missing_names.txt"], "does not exist"),
    (["--overlay", "out.gif"], "--overlay out.gif: use one of"),
])
def test_option_errors_are_one_line(tiny_bundle, demo_mp4, tmp_path, capsys, extra, words):
    rc, _, err = _run([tiny_bundle, demo_mp4.path, "-o", tmp_path / "r.json", *extra], capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "r.json").exists()


def test_bundle_and_output_errors(tmp_path, demo_mp4, tiny_bundle, capsys):
    rc, _, err = _run([tmp_path / "nope", demo_mp4.path], capsys)
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run([tiny_bundle, demo_mp4.path, "-o", tmp_path], capsys)
    assert rc == 2 and "is a folder" in err
    rc, _, err = _run([tiny_bundle], capsys)
    assert rc == 2 and "no input" in err


# `dvis-trt demo` (the README's first command) runs in tests/test_readme.py, from a temporary
# folder with the user cache elsewhere, with the checks that stood here.


def test_outputs_that_would_overwrite_an_input_or_each_other_are_refused(tiny_bundle, demo_mp4,
                                                                         tmp_path, capsys):
    video = tmp_path / "in.mp4"
    video.write_bytes(demo_mp4.path.read_bytes())
    before = video.read_bytes()
    for extra in (["-o", str(tmp_path / "r.json"), "--overlay", str(video)],
                  ["-o", str(video)],
                  ["-o", str(tmp_path / "x.mp4"), "--overlay", str(tmp_path / "x.mp4")]):
        rc = main(["run", str(tiny_bundle), str(video), "-q", *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
    assert video.read_bytes() == before
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "r.json").exists()


def test_clip_frames_auto_is_one_clip_when_it_fits_and_clips_when_not(tiny_bundle, demo_mp4,
                                                                      tmp_path, capsys):
    one = tmp_path / "one.json"
    auto = tmp_path / "auto.json"
    assert main(["run", str(tiny_bundle), str(demo_mp4.path), "-q", "-o", str(one),
                 "--clip-frames", "0"]) == 0
    assert main(["run", str(tiny_bundle), str(demo_mp4.path), "-q", "-o", str(auto)]) == 0
    assert json.loads(one.read_text()) == json.loads(auto.read_text())
    small = tmp_path / "small.json"
    assert main(["run", str(tiny_bundle), str(demo_mp4.path), "-o", str(small),
                 "--memory-gb", "0.0005"]) == 0
    cap = capsys.readouterr()
    assert "processing in clips of" in cap.out + cap.err
    data = json.loads(small.read_text())
    scores = [d["score"] for d in data]
    assert scores == sorted(scores, reverse=True)  # merged clips come back best first
