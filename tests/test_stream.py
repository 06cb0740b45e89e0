"""``dvis-trt stream`` / ``dvis_trt.stream``: live pacing, the drop policy, reconnects, sinks.

No timed assertions: counts are exact (every source frame is either processed or counted as
dropped) and the latency bound is relative to the service time measured in the same run
(with ``drop-oldest`` and a queue of 1, a frame waits at most for the one being processed:
latency <= 2 x the longest service time; 0.5 s of slack for thread wake-ups). Without the drop
policy the last frame of this clip would wait ~13 service times.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from dvis_trt.runtime.cli import main


def test_stream_cli_at_a_slow_inference_rate_drops_and_counts(tiny_bundle, demo_mp4, tmp_path,
                                                              capsys):
    out = tmp_path / "live.jsonl"
    rc = main(["stream", str(tiny_bundle), str(demo_mp4.path), "--backend", "ort",
               "--threads", "2", "--throttle", "0.3", "--jsonl", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    dropped = int(err.split(" dropped of ")[0].rsplit(", ", 1)[1].split()[0])
    read = int(err.split(" dropped of ")[1].split()[0])
    assert read == 20 and dropped >= 5 and len(recs) + dropped == read, err
    idx = [r["frame"] for r in recs]
    assert idx == sorted(set(idx)) and idx[0] == 0
    r = recs[-1]
    assert {"frame", "timestamp", "height", "width", "latency_ms", "instances"} <= set(r)
    assert r["timestamp"] == pytest.approx(r["frame"] / 10, abs=1e-3)   # 10 fps clip
    inst = recs[0]["instances"][0]
    assert {"track_id", "class", "score", "box", "rle"} <= set(inst)
    # an existing file is never written over; an output never goes into an input
    rc = main(["stream", str(tiny_bundle), str(demo_mp4.path), "--jsonl", str(out)])
    assert rc != 0 and "exists" in capsys.readouterr().err
    rc = main(["stream", str(tiny_bundle), str(demo_mp4.path), "--jsonl",
               str(tiny_bundle / "x.jsonl")])
    assert rc != 0 and "BUNDLE" in capsys.readouterr().err
    assert not (tiny_bundle / "x.jsonl").exists()


def test_stream_latency_stays_bounded_with_drop_oldest(tiny_bundle, demo_mp4):
    import dvis_trt

    session = dvis_trt.stream(tiny_bundle, demo_mp4.path, backend="ort", threads=2,
                              throttle=0.25, max_frames=12)
    with session:
        results = list(session)
    st = session.stats
    assert st.frames_in == 12 and st.dropped >= 3
    assert len(results) + st.dropped == 12
    lat = [r.latency for r in results]
    assert max(lat) <= 2 * st.service_max + 0.5, (lat, st.service_max)


SERVER = textwrap.dedent("""
    import sys, time, av, numpy as np
    port, n, shade = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    out = av.open(f"tcp://127.0.0.1:{port}?listen=1", mode="w", format="mpegts")
    st = out.add_stream("mpeg2video", rate=25)
    st.width, st.height, st.pix_fmt = 96, 64, "yuv420p"
    for i in range(n):
        img = np.zeros((64, 96, 3), np.uint8)
        img[:, :, 0] = shade
        img[10 + i:40 + i, 20:50] = 255
        for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(p)
        time.sleep(0.01)
    for p in st.encode():
        out.mux(p)
    out.close()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stream_reconnects_after_the_server_restarts(tiny_bundle, tmp_path):
    """A PyAV process serves MPEG-TS over TCP on 127.0.0.1, exits, and a second one serves
    again on the same port: the client reconnects (with back-off, also over refused
    connections) and keeps going; it gives up after the allowed failed attempts."""
    import dvis_trt

    port = _free_port()
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    first = subprocess.Popen([sys.executable, str(script), str(port), "10", "40"])
    session = dvis_trt.stream(tiny_bundle, f"tcp://127.0.0.1:{port}", backend="ort", threads=2,
                              drop="block", backoff=0.1, backoff_max=0.3, max_reconnects=8,
                              timeout=3)
    second = None
    results = []
    try:
        with session:
            for r in session:
                results.append(r)
                if second is None and first.poll() is not None:
                    second = subprocess.Popen([sys.executable, str(script), str(port), "10",
                                               "200"])
    finally:
        for p in (first, second):
            if p is not None:
                p.kill() if p.poll() is None else None
                p.wait(timeout=10)
    st = session.stats
    assert second is not None
    assert st.reconnects >= 1 and st.frames_in > 10, (st.reconnects, st.frames_in, st.errors)
    assert len(results) == st.frames_in
    assert [r.index for r in results] == list(range(len(results)))  # indices continue
    assert any("gave up" in e for e in st.errors)


def test_sigterm_stops_the_stream_cleanly_with_outputs_closed(tiny_bundle, demo_mp4, tmp_path):
    """SIGTERM while streaming: exit 0, every JSON line whole, the overlay finalised under its
    name (its temporary renamed), nothing else left in the folder."""
    import signal
    import time

    jsonl, overlay = tmp_path / "out.jsonl", tmp_path / "overlay.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvis_trt.runtime.cli", "stream", str(tiny_bundle),
         str(demo_mp4.path), "--backend", "ort", "--threads", "1", "--throttle", "0.2",
         "--jsonl", str(jsonl), "--overlay", str(overlay)],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (not jsonl.exists() or not jsonl.read_text().count("\n")) and \
                time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    lines = jsonl.read_text().splitlines()
    assert 1 <= len(lines) < 20 and all(json.loads(ln)["frame"] >= 0 for ln in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "overlay.mp4"]
    from dvis_trt.runtime.video import open_source
    assert open_source(overlay).num_frames in (len(lines), None)


def test_stream_cleans_a_killed_streams_overlay_temporary(tiny_bundle, demo_mp4, tmp_path, capsys):
    """kill -9 leaves ``.overlay.mp4.dvis-trt-tmp-<pid>-<rand>.mp4``; the next stream writing an
    overlay into that folder removes it (dead pid, unchanged for a minute), and nothing else."""
    stale = tmp_path / ".overlay.mp4.dvis-trt-tmp-999999999-0123abcd.mp4"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (1e9, 1e9))
    mine = tmp_path / ".my-notes.mp4"
    mine.write_bytes(b"mine")
    rc = main(["stream", str(tiny_bundle), str(demo_mp4.path), "--backend", "ort",
               "--no-realtime", "--max-frames", "2", "--jsonl", str(tmp_path / "o.jsonl"),
               "--overlay", str(tmp_path / "overlay2.mp4")])
    assert rc == 0, capsys.readouterr().err
    assert not stale.exists() and mine.read_bytes() == b"mine"
    assert (tmp_path / "overlay2.mp4").is_file()
