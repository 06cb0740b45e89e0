"""``dvis-trt stream``: a live source (camera, network stream, file) in, JSON Lines per frame out.

Examples::

    dvis-trt stream bundle/ rtsp://10.0.0.5:554/cam1 --jsonl detections.jsonl
    dvis-trt stream bundle/ /dev/video0 --overlay live.mp4          # JSON Lines on stdout
    dvis-trt stream bundle/ clip.mp4 --mode near-online --clip-frames 15 --no-realtime
    dvis-trt stream bundle/ tcp://127.0.0.1:9000 --max-reconnects 20 --drop drop-oldest

Exit status: 0 when the source ended (or SIGINT/SIGTERM stopped the stream), 1 when a network
source was lost for good (``--max-reconnects`` failed attempts in a row), 2 for bad options.
"""
from __future__ import annotations

import argparse
import signal
import sys

from .cli import positive_int as _positive
from dvis_trt.errors import InputError

__all__ = ["add_arguments", "run"]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dvis-trt stream``."""
    from .backends.registry import BACKENDS
    from .stream_sources import DROP_POLICIES

    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder (`dvis-trt export`)")
    parser.add_argument("source", metavar="SOURCE",
                        help="a video file, a V4L2 camera (/dev/video0) or a stream URL "
                             "(rtsp://, http(s)://, udp://, tcp://, rtmp://, srt://)")
    parser.add_argument("--mode", choices=("online", "near-online"), default="online",
                        help="online: the online model, a result per frame as soon as it is "
                             "done (default); near-online: the offline model over clips of "
                             "--clip-frames frames, a clip's results when it closes")
    parser.add_argument("--clip-frames", type=_positive, default=15, metavar="N",
                        help="near-online clip length (default 15)")
    parser.add_argument("--jsonl", default="-", metavar="out.jsonl",
                        help="JSON Lines, one record per frame: a new file, or - for stdout "
                             "(default)")
    parser.add_argument("--overlay", default=None, metavar="out.mp4",
                        help="also write the processed frames with masks, ids, classes, scores")
    parser.add_argument("--all-tracks", action="store_true",
                        help="also list tracks in their grace period (missed this frame, not "
                             "yet kicked out), with \"valid\": false")
    parser.add_argument("--drop", choices=DROP_POLICIES, default="drop-oldest",
                        help="when inference is slower than the source: drop the oldest waiting "
                             "frame (default; latency stays bounded), drop arriving frames, or "
                             "block (no drops; latency grows)")
    parser.add_argument("--queue", type=_positive, default=None, metavar="N",
                        help="frames waiting for inference (default 1 online, --clip-frames "
                             "near-online)")
    parser.add_argument("--no-realtime", dest="realtime", action="store_false", default=None,
                        help="read a file as fast as inference goes (every frame, none "
                             "dropped) instead of at its own frame rate")
    parser.add_argument("--max-frames", type=_positive, default=None, metavar="N",
                        help="stop after N source frames")
    parser.add_argument("--no-reconnect", dest="reconnect", action="store_false", default=None,
                        help="end when a network source drops (default: reconnect)")
    parser.add_argument("--max-reconnects", type=int, default=None, metavar="N",
                        help="failed reconnect attempts in a row before giving up "
                             "(default: forever)")
    parser.add_argument("--backoff", type=_seconds, default=0.5, metavar="S",
                        help="first wait before reconnecting, doubled per failed attempt "
                             "(default 0.5)")
    parser.add_argument("--backoff-max", type=_seconds, default=10.0, metavar="S",
                        help="longest wait between attempts (default 10)")
    parser.add_argument("--timeout", type=_seconds, default=5.0, metavar="S",
                        help="a network source silent this long counts as dropped (default 5)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="FFmpeg option for opening the source, e.g. rtsp_transport=tcp, "
                             "video_size=1280x720 (repeatable)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto (TensorRT engines if built for this GPU, else ONNX Runtime),"
                             " ort, trt, torch (needs --checkpoint)")
    parser.add_argument("--providers", default=None, metavar="LIST",
                        help="ONNX Runtime execution providers, e.g. 'cuda,cpu'")
    parser.add_argument("--threads", type=_positive, default=None, metavar="N",
                        help="CPU threads for ONNX Runtime / torch")
    parser.add_argument("--checkpoint", default=None, metavar="model.pth",
                        help="weights for --backend torch")
    parser.add_argument("--throttle", type=_seconds, default=0.0, metavar="S",
                        help="spend at least S seconds per frame (simulates a slower model, "
                             "e.g. to check the drop policy)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no summary line on stderr")


def run(args: argparse.Namespace) -> int:
    from .stream import stream

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = value
    if args.max_reconnects is not None and args.max_reconnects < 0:
        raise InputError(f"--max-reconnects must be >= 0, got {args.max_reconnects}")
    session = stream(args.bundle, args.source, mode=args.mode, clip_frames=args.clip_frames,
                     backend=args.backend, threads=args.threads, providers=args.providers,
                     checkpoint=args.checkpoint, queue_size=args.queue, drop=args.drop,
                     realtime=args.realtime, reconnect=args.reconnect,
                     max_reconnects=args.max_reconnects, backoff=args.backoff,
                     backoff_max=args.backoff_max, timeout=args.timeout,
                     max_frames=args.max_frames, throttle=args.throttle, jsonl=args.jsonl,
                     overlay=args.overlay, include_invalid=args.all_tracks, options=options)
    stopped = []

    def on_signal(signum, _frame):
        stopped.append(signum)
        session.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with session:
            for _ in session:
                pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    stats = session.stats
    if not args.quiet:
        why = f" (stopped by {signal.Signals(stopped[0]).name})" if stopped else ""
        print(f"dvis-trt stream: {stats.summary()}{why}", file=sys.stderr, flush=True)
        for sink in session.sinks:
            if getattr(sink, "failed", None):
                print(f"dvis-trt stream: warning: overlay failed: {sink.failed}",
                      file=sys.stderr, flush=True)
    lost = [e for e in stats.errors if "gave up" in e]
    if lost and not stopped:
        print(f"dvis-trt stream: error: {lost[-1]}", file=sys.stderr, flush=True)
        return 1
    return 0
