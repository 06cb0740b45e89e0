"""Run videos through a bundle: inputs, backend choice, prefetching, pipeline, writers (no torch).

What ``dvis-trt run`` (and ``dvis-trt demo``) call:

* :func:`~dvis_trt.runtime.inputs.discover_inputs` (in :mod:`.inputs`): video files, frame
  folders, a folder of such folders, single images, or a YouTube-VIS dataset json.
* backends come from :func:`~dvis_trt.runtime.backends.registry.create_backend` (``auto``
  picks TensorRT engines built for this machine, else ONNX Runtime).
* :class:`Runner`: loads the bundle once and runs :class:`VideoJob` s: decoding in a bounded
  background queue (:func:`~dvis_trt.runtime.video.prefetch`) ahead of
  :class:`~dvis_trt.runtime.pipeline.OfflinePipeline`, a tqdm progress bar, a per-video
  summary line, YouTube-VIS results and the optional overlay video.
* :func:`run_videos`: the whole command (bad videos in a batch are reported and skipped; the
  results file is written atomically once, at the end).

Errors are :class:`~dvis_trt.errors.DvisTrtError` subclasses with one line saying what,
where and what to do.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple, Union


from dvis_trt.errors import DvisTrtError, InputError

from .backends.registry import create_backend
from .bundle import BundleManifest, load_constants, load_manifest
from .inputs import VideoJob, check_outputs, overlay_paths
from .pipeline import FILL_ID_BASE, OfflinePipeline, VideoResult
from .postprocess import MaskUpsampler
from .preprocess import ResizeGeometry
from .results import InstanceTrack, ytvis_results
from .video import VideoSource, prefetch

__all__ = ["VideoOutcome", "RunSummary", "limit_blas_threads", "Runner", "run_videos"]

PathLike = Union[str, "os.PathLike[str]"]

# --------------------------------------------------------------------------------------------
# host threads
# --------------------------------------------------------------------------------------------
_BLAS_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                 "MKL_Set_Num_Threads")


def limit_blas_threads(n: int = 1) -> int:
    """Set the thread count of the BLAS libraries loaded in this process (numpy's OpenBLAS,
    MKL) to ``n``; returns how many libraries were changed (0 where none can be found).

    Why: the host side's matrix products are tiny (at most 100 x 256 x 100 per frame: the slot
    match, the frame link), where a multi-threaded BLAS gains nothing, and its worker threads
    fight the engines' own thread pools (ONNX Runtime's workers spin for a while after each
    run): on a 2-core machine a 70 x 256 x 100 product took 5 ms instead of 0.04 ms
    (``benchmarks/host_overhead.py``). Uses ``threadpoolctl`` when installed, else finds the
    libraries in ``/proc/self/maps`` (Linux) and calls their ``*_set_num_threads``.
    """
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        threadpool_limits(limits=int(n), user_api="blas")
        return 1
    import ctypes

    try:
        with open("/proc/self/maps", "r", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f
                     if ("blas" in line.lower() or "libmkl_rt" in line) and ".so" in line}
    except OSError:
        return 0
    changed = 0
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                try:
                    fn(ctypes.c_int(int(n)))
                    changed += 1
                except Exception:  # pragma: no cover - an odd build: leave it alone
                    pass
                break
    return changed


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
@dataclass
class VideoOutcome:
    """One processed video: its merged result, its YouTube-VIS dicts and timings."""

    job: VideoJob
    source: VideoSource
    result: VideoResult
    results: List[Dict[str, Any]]
    seconds: float
    overlay: Optional[Path] = None
    contact_sheet: Optional[Path] = None
    #: presentation time (s) of each frame as stored (variable frame rate kept; None if unknown)
    timestamps: List[Optional[float]] = field(default_factory=list)
    #: timeline ranges ``(start, stop)`` of frames lost to damage (lenient decoding)
    lost_frames: List[Tuple[int, int]] = field(default_factory=list)
    #: frames on the video's timeline (decoded + lost); the results have one entry per frame
    timeline_frames: Optional[int] = None

    @property
    def fps(self) -> float:
        return self.result.num_frames / self.seconds if self.seconds > 0 else float("inf")

    def summary(self, line: str = "") -> Dict[str, Any]:
        """What a video's shard records besides its results (JSON types)."""
        r = self.result
        return {"name": self.job.name, "frames": int(self.timeline_frames or r.num_frames),
                "lost_frames": [list(x) for x in self.lost_frames],
                "size": [int(x) for x in r.image_size], "tracks": int(r.num_tracks),
                "instances": int(len(r.scores)), "seconds": round(float(self.seconds), 6),
                "line": line}


@dataclass
class RunSummary:
    """What :func:`run_videos` did."""

    outcomes: List[VideoOutcome]
    failures: List[Tuple[VideoJob, str]]
    output: Optional[Path]
    backend: str
    results: List[Dict[str, Any]] = field(default_factory=list)
    #: videos whose results were kept but whose overlay could not be written
    secondary_failures: List[Tuple[VideoJob, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every video ran and every output was written; 2 when some video was skipped
        or some overlay could not be written."""
        return 2 if self.failures or self.secondary_failures else 0


def _label_text(label: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names and 0 <= label < len(class_names):
        return str(class_names[label])
    return f"class {label + 1}"


class Runner:
    """Loads a bundle and a backend once, then runs videos through the offline pipeline.

    Args:
        bundle: bundle folder (``dvis-trt export`` output) or a loaded :class:`BundleManifest`.
        backend: ``auto`` / ``ort`` / ``torch`` / ``trt`` (see :func:`~dvis_trt.runtime.backends.registry.create_backend`), or a
            ready :class:`~dvis_trt.runtime.backends.base.Backend` (loaded with every stage).
        threads: intra-op threads (ONNX Runtime sessions, the mask resizer, torch).
        window: frames per segmenter / mask-head call (a performance knob; results do not
            depend on it). Default 5, the official window.
        clip_frames: process long videos in clips of this many frames with the tracker state
            carried across clips (track ids stay stable; peak memory is bounded by it).
            None: the whole video is one clip (the official offline path).
        class_names: names in class order (None: the bundle's, else ``class <id>``).
        category_ids: dataset category ids in contiguous order (None: ``label + 1``).
        quiet: no progress bar and no summary lines.
        stream: where progress and summaries go (default stderr for the bar, stdout for lines).
        prefetch_frames: decoded frames the background decoder may queue ahead.
        overlay_min_score: instances scoring below this are not drawn in overlays (the
            official demo drops scores below 0.3).
        providers / checkpoint / config_file: see
            :func:`~dvis_trt.runtime.backends.registry.create_backend`.
        verify: check the bundle files' sha256 on load.
        host_blas_threads: BLAS threads for the host-side numpy work (default 1, see
            :func:`limit_blas_threads`; None leaves BLAS alone).
    Raises:
        BundleError / DependencyError / InputError as :func:`load_manifest` and
        :func:`~dvis_trt.runtime.backends.registry.create_backend`.
    """

    def __init__(self, bundle: Union[PathLike, BundleManifest], backend: Any = "auto", *,
                 threads: Optional[int] = None, window: int = 5,
                 clip_frames: Union[int, str, None] = None, memory_gb: float = 4.0,
                 class_names: Optional[Sequence[str]] = None,
                 category_ids: Optional[Sequence[int]] = None, quiet: bool = False,
                 stream: Optional[TextIO] = None, prefetch_frames: int = 8,
                 overlay_min_score: float = 0.3, providers: Optional[str] = None,
                 checkpoint: Optional[PathLike] = None, config_file: Optional[PathLike] = None,
                 verify: bool = True, host_blas_threads: Optional[int] = 1):
        if int(window) < 1:
            raise InputError(f"--window must be >= 1, got {window}")
        if clip_frames == 0:
            clip_frames = None
        if clip_frames not in (None, "auto") and int(clip_frames) < 1:
            raise InputError(f"--clip-frames must be 'auto', 0 or >= 1, got {clip_frames}")
        if threads is not None and int(threads) < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        import math

        from .validate import clamp_threads
        threads = clamp_threads(threads)       # more threads than CPUs: clamped, with a warning
        if not (isinstance(memory_gb, (int, float)) and math.isfinite(memory_gb)
                and memory_gb > 0):
            raise InputError(f"--memory-gb must be a finite number > 0, got {memory_gb}")
        self.manifest = bundle if isinstance(bundle, BundleManifest) else \
            load_manifest(bundle, verify=verify)
        constants = load_constants(self.manifest)
        if isinstance(backend, str):
            self.backend = create_backend(backend, self.manifest, threads=threads,
                                          providers=providers, checkpoint=checkpoint,
                                          config_file=config_file)
            self.backend_desc = self.backend.description
            self._own_backend = True
        else:
            self.backend, self.backend_desc = backend, getattr(backend, "name", "custom")
            self._own_backend = False
        if host_blas_threads is not None:
            limit_blas_threads(int(host_blas_threads))
        self.settings = self.manifest.config
        self.pipeline = OfflinePipeline(self.backend, self.settings, constants,
                                        window=int(window),
                                        upsampler=MaskUpsampler(intra_op_threads=threads or 0))
        self.clip_frames = clip_frames if clip_frames in (None, "auto") else int(clip_frames)
        self.memory_gb = float(memory_gb)
        self.class_names = list(class_names) if class_names else (
            list(self.manifest.config.class_names) if self.manifest.config.class_names else None)
        self.category_ids = list(category_ids) if category_ids else None
        if self.category_ids is not None and len(self.category_ids) != self.settings.num_classes:
            print(f"dvis-trt: warning: the dataset json lists {len(self.category_ids)} "
                  f"categories but the model has {self.settings.num_classes} classes; results "
                  "use category_id = label + 1", file=sys.stderr, flush=True)
            self.category_ids = None
        self.quiet = bool(quiet)
        self.stream = stream
        self.prefetch_frames = int(prefetch_frames)
        self.overlay_min_score = float(overlay_min_score)
        self.backend_name = backend if isinstance(backend, str) else self.backend_desc
        self.providers = providers

    def shard_key(self, **extra: Any) -> str:
        """Key of this run's shards (:func:`~dvis_trt.runtime.shards.key_for_run`)."""
        from .shards import key_for_run

        return key_for_run(self.manifest.root, backend=self.backend_name,
                           providers=self.providers, window=self.pipeline.window,
                           clip_frames=self.clip_frames, memory_gb=self.memory_gb,
                           category_ids=self.category_ids, **extra)

    # -- output helpers ----------------------------------------------------------------------
    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream or sys.stdout, flush=True)

    def _progress(self, job: VideoJob, total: Optional[int]):
        if self.quiet:
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a core dependency
            return None
        return tqdm(total=total, desc=job.name[:24], unit="frame", leave=False,
                    file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    # -- one video -----------------------------------------------------------------------------
    def clip_cost(self, source: VideoSource, geometry: Optional[ResizeGeometry] = None):
        """The memory cost model of ``source`` on this bundle
        (:class:`~dvis_trt.runtime.memory.ClipCost`)."""
        from .memory import ClipCost

        c = self.manifest.config
        g = geometry or ResizeGeometry.of(source.size[0], source.size[1], c)
        weights = 0
        for st in self.manifest.stages.values():
            try:
                weights += (self.manifest.root / st.file).stat().st_size
            except OSError:
                pass
        return ClipCost.for_video(c, g.orig, g.resized, g.padded,
                                  window=self.pipeline.window, weight_bytes=weights)

    def auto_clip_frames(self, source: VideoSource,
                         geometry: Optional[ResizeGeometry] = None) -> Optional[int]:
        """Clip length for ``--clip-frames auto``: None (one clip, the official behaviour)
        when the whole video fits in ``memory_gb`` (the process's peak), else the longest clip
        that does, evened out over the video (1,000 frames that fit 300 at a time: 4 clips of
        250). The estimate counts every array that grows with the clip, the refiner's time
        attention and the results (:mod:`~dvis_trt.runtime.memory`); an unknown frame count
        counts as long. Warns once when even one segmenter window exceeds the budget."""
        from .memory import plan_clip_frames

        cost = self.clip_cost(source, geometry)
        n = source.num_frames
        clip, fits = plan_clip_frames(cost, self.memory_gb * (1 << 30), n,
                                      min_frames=self.pipeline.window)
        if not fits:
            need = cost.peak_bytes(clip, n or clip) / (1 << 30)  # n None: the clip alone
            print(f"dvis-trt: warning: --memory-gb {self.memory_gb:g} is below what even "
                  f"{clip}-frame clips of this {source.size[1]}x{source.size[0]} video need "
                  f"(about {need:.2f} GB); running {clip}-frame clips", file=sys.stderr,
                  flush=True)
        if clip is not None and n:
            clips = -(-n // clip)
            clip = -(-n // clips)
        return clip

    def run_source(self, job: VideoJob, source: VideoSource,
                   overlay: Optional[PathLike] = None) -> VideoOutcome:
        """Run one opened video: pipeline, YouTube-VIS dicts, optional overlay.

        The steps: the video's resize geometry (once), the clip length, decode + pipeline,
        the results on the video's timeline, the overlay. Raises InputError when the video turns
        out to be unreadable midway (nothing of it is kept) and whatever the backend raises."""
        geometry = ResizeGeometry.of(source.size[0], source.size[1], self.settings)
        clip_frames = self._clip_frames_for(job, source, geometry)
        result, stamps, slots, seconds = self._decode_and_run(job, source, geometry,
                                                              clip_frames)
        out = self._outcome(job, source, result, stamps, slots, seconds)
        if overlay is not None:
            try:
                self.write_overlay(out, overlay)
            except ValueError as exc:
                raise InputError(f"cannot write the overlay '{overlay}': {exc}") from None
        return out

    def _clip_frames_for(self, job: VideoJob, source: VideoSource,
                         geometry: ResizeGeometry) -> Optional[int]:
        """``--clip-frames`` for this video (``auto``: from the memory model, said once)."""
        clip_frames = self.clip_frames
        if clip_frames == "auto":
            clip_frames = self.auto_clip_frames(source, geometry)
            if clip_frames is not None:
                self.say(f"{job.name}: {source.num_frames or 'many'} frames at "
                         f"{source.size[1]}x{source.size[0]}: processing in clips of "
                         f"{clip_frames} frames to stay within --memory-gb {self.memory_gb:g} "
                         "(tracks carry across clips; --clip-frames 0 for one clip)")
        return clip_frames

    def _decode_and_run(self, job: VideoJob, source: VideoSource, geometry: ResizeGeometry,
                        clip_frames: Optional[int]):
        """Decode in the background and run the pipeline; returns (VideoResult, timestamps,
        timeline slots, seconds). Frames go video -> pipeline directly (resized once there)."""
        bar = self._progress(job, source.num_frames)
        stamps: List[Optional[float]] = []
        slots: List[int] = []

        def rgb_frames(frames):
            for f in frames:  # the stored timestamps and timeline slots are kept
                stamps.append(f.pts_seconds)
                slots.append(int(f.index))
                yield f.rgb

        t0 = time.perf_counter()
        try:
            with prefetch(source, max_queue=self.prefetch_frames) as frames:
                result = self.pipeline.run_video(
                    rgb_frames(frames), clip_frames=clip_frames,
                    on_frames=(bar.update if bar is not None else None), geometry=geometry)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        if result.num_frames == 0:
            raise InputError(f"'{job.path or job.name}' yielded no frames; check the file")
        return result, stamps, slots, seconds

    def _outcome(self, job: VideoJob, source: VideoSource, result: VideoResult,
                 stamps: List[Optional[float]], slots: List[int],
                 seconds: float) -> VideoOutcome:
        """The video's YouTube-VIS dicts, one entry per frame of its timeline."""
        instances = [InstanceTrack(track_id=int(result.track_ids[i]),
                                   label=int(result.labels[i]), score=float(result.scores[i]),
                                   segmentations=result.segmentations[i])
                     for i in range(len(result.scores))]
        dicts = ytvis_results(job.video_id, instances, self.category_ids,
                              num_frames=result.num_frames)
        total = _place_on_timeline(dicts, slots, source)
        return VideoOutcome(job=job, source=source, result=result, results=dicts,
                            seconds=seconds, timestamps=stamps,
                            lost_frames=[tuple(r) for r in (source.lost_frames or ())],
                            timeline_frames=total)

    def write_overlay(self, out: VideoOutcome, overlay: PathLike) -> Path:
        """Write the overlay video of a finished video (decodes it again, streaming); sets
        ``out.overlay``. Raises whatever the writer raises (OSError for a full disk or a name
        too long, ValueError for a container/codec PyAV cannot write): :func:`run_videos`
        reports it for that video only."""
        from .overlay import write_overlay

        r = out.result
        instances = [InstanceTrack(track_id=int(r.track_ids[i]), label=int(r.labels[i]),
                                   score=float(r.scores[i]), segmentations=r.segmentations[i])
                     for i in range(len(r.scores))]
        write_overlay(overlay, out.source.iter_frames(), instances, self.class_names,
                      fps=out.source.fps, min_score=self.overlay_min_score)
        out.overlay = Path(overlay)
        return out.overlay

    def write_contact_sheet(self, out: VideoOutcome, path: PathLike, frames: int = 9) -> Path:
        """Write ``frames`` overlay frames of a finished video as a PNG grid (decodes it again);
        sets ``out.contact_sheet``. Raises what the writer raises, like :meth:`write_overlay`."""
        from .overlay import write_contact_sheet

        r = out.result
        instances = [InstanceTrack(track_id=int(r.track_ids[i]), label=int(r.labels[i]),
                                   score=float(r.scores[i]), segmentations=r.segmentations[i])
                     for i in range(len(r.scores))]
        write_contact_sheet(path, out.source.iter_frames(), instances, self.class_names,
                            num=frames, num_frames=r.num_frames,
                            min_score=self.overlay_min_score)
        out.contact_sheet = Path(path)
        return out.contact_sheet

    def summary_line(self, out: VideoOutcome, index: int = 0, total: int = 1) -> str:
        """``[i/n] name: T frames HxW | tracks born, instances | top instances | frames/s``."""
        r = out.result
        h, w = r.image_size
        from .overlay import display_id

        n_fill = int((r.track_ids >= FILL_ID_BASE).sum())
        top = sorted(range(len(r.scores)), key=lambda i: -float(r.scores[i]))[:3]
        tops = ", ".join(f"{display_id(r.track_ids[i])} "
                         f"{_label_text(int(r.labels[i]), self.class_names)}"
                         f" {float(r.scores[i]):.2f}" for i in top)
        fill = (f"{n_fill} from the frame link, shown as f1, f2...: added by the refiner from "
                "the segmenter's per-frame queries, never tracked" if n_fill else
                "0 from the frame link")
        shown = int((r.scores >= self.overlay_min_score).sum())
        clips = f", {len(r.clips)} clips" if len(r.clips) > 1 else ""
        if out.lost_frames:
            n_lost = sum(b - a for a, b in out.lost_frames)
            where = ", ".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in out.lost_frames)
            clips += (f", {n_lost} of {out.timeline_frames} frames lost to damage (frames "
                      f"{where}: null in the results)")
        return (f"[{index + 1}/{total}] {out.job.name}: {r.num_frames} frames {h}x{w}{clips} | "
                f"{r.num_tracks} tracks born (#id), {len(r.scores)} instances ({fill}; "
                f"{shown} >= {self.overlay_min_score:g}) | top: {tops or '-'} | "
                f"{out.fps:.1f} frames/s")

    def close(self) -> None:
        if self._own_backend:
            self.backend.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _place_on_timeline(dicts: List[Dict[str, Any]], slots: Sequence[int],
                       source: VideoSource) -> int:
    """Put each decoded frame's segmentation at its slot on the video's timeline (lenient
    decoding loses frames; those slots hold ``None``), in place. Returns the timeline's length:
    one result entry per frame of the video, so later frames keep their true index."""
    n = len(slots)
    total = max(int(source.timeline_frames or 0), (slots[-1] + 1) if slots else 0, n)
    if total == n and all(s == i for i, s in enumerate(slots)):
        return n
    for d in dicts:
        segs = d["segmentations"]
        placed: List[Optional[Dict[str, Any]]] = [None] * total
        for k, slot in enumerate(slots):
            placed[slot] = segs[k]
        d["segmentations"] = placed
    return total


def run_videos(runner: Runner, jobs: Sequence[VideoJob], output: Optional[PathLike],
               overlay: Optional[PathLike] = None, *, keep_going: bool = False,
               resume: Optional[bool] = None,
               key_options: Optional[Dict[str, Any]] = None,
               reads: Sequence[Tuple[str, Optional[PathLike]]] = (),
               contact_sheet: Optional[PathLike] = None,
               sheet_frames: int = 9) -> RunSummary:
    """Run every job; write ``output`` (all videos' results, one flat list) atomically at the end.

    Each finished video is committed at once as a shard in ``<output>.shards/``
    (:mod:`~dvis_trt.runtime.shards`) and ``output`` is their merge in input order, so an
    aborted run keeps its finished videos. ``resume`` (None: when that folder exists) skips
    videos whose shard matches this bundle, these options (``key_options`` adds the caller's,
    e.g. ``lenient``) and the video file; False runs every video again.

    A video that cannot be read — missing, empty, not a video, no frames, corrupt or truncated
    midway — is reported on one line and skipped; the others still run and the summary's exit
    code is 2. Any other failure on a video (a stage error, out of memory) aborts the run unless
    ``keep_going`` (then it is reported and skipped too). When the run aborts, or when no
    video could be processed, nothing is written (the error propagates).

    Returns:
        :class:`RunSummary` (results, failures, the written path).
    """
    from .shards import open_journal, video_identity

    overlays = overlay_paths(overlay, jobs)
    sheets = {i: p if p.suffix.lower() == ".png" else p.with_suffix(".png")
              for i, p in overlay_paths(contact_sheet, jobs).items()}
    check_outputs(jobs, output, overlays, reads=[("the bundle", runner.manifest.root), *reads],
                  sheets=sheets)
    outcomes: List[VideoOutcome] = []
    failures: List[Tuple[VideoJob, str]] = []
    secondary: List[Tuple[VideoJob, str]] = []   # overlays that failed (results kept)
    total = len(jobs)
    runner.say(f"backend: {runner.backend_desc}")
    journal = open_journal(output, runner.shard_key(**(key_options or {})) if output is not None
                           else "", [video_identity(j.name, j.video_id, j.path) for j in jobs],
                           resume, runner.say)
    with journal:  # each finished video is a shard at once; an abort says how to resume
        for i, job in enumerate(jobs):
            if journal.done(i):  # finished by an earlier run (its shard matches)
                continue
            try:
                source = job.open()
                out = runner.run_source(job, source)
            except InputError as exc:
                if total == 1:
                    raise
                failures.append((job, str(exc)))
                print(f"dvis-trt: skipped [{i + 1}/{total}] {job.name}: {exc}", file=sys.stderr,
                      flush=True)
                continue
            except (DvisTrtError, MemoryError, RuntimeError, ValueError) as exc:
                if not keep_going or total == 1:
                    raise
                failures.append((job, f"{type(exc).__name__}: {exc}"))
                print(f"dvis-trt: skipped [{i + 1}/{total}] {job.name}: {type(exc).__name__}: "
                      f"{exc}", file=sys.stderr, flush=True)
                continue
            outcomes.append(out)
            line = runner.summary_line(out, i, total)
            journal.commit(i, out.results, out.summary(line))
            runner.say(line)
            if i in overlays:  # a secondary output: its failure costs only itself
                try:
                    runner.write_overlay(out, overlays[i])
                except Exception as exc:  # noqa: BLE001 - any writer failure (disk full, ...)
                    why = _one_line_error(exc)
                    secondary.append((job, f"overlay {overlays[i]}: {why}"))
                    print(f"dvis-trt: error: [{i + 1}/{total}] {job.name}: the overlay "
                          f"{overlays[i]} could not be written ({why}); its results are kept",
                          file=sys.stderr, flush=True)
            if i in sheets:  # the contact sheet: a secondary output too
                try:
                    runner.write_contact_sheet(out, sheets[i], sheet_frames)
                except Exception as exc:  # noqa: BLE001 - any writer failure (disk full, ...)
                    why = _one_line_error(exc)
                    secondary.append((job, f"contact sheet {sheets[i]}: {why}"))
                    print(f"dvis-trt: error: [{i + 1}/{total}] {job.name}: the contact sheet "
                          f"{sheets[i]} could not be written ({why}); its results are kept",
                          file=sys.stderr, flush=True)
        if not outcomes and not journal.resumed:
            raise InputError(f"none of the {total} videos could be processed (see the lines "
                             "above); nothing was written")
        results = journal.results()
        written = journal.write(output, results)
        summary = RunSummary(outcomes=outcomes, failures=failures, output=written,
                             backend=runner.backend_desc, results=results,
                             secondary_failures=secondary)
    frames = sum(o.result.num_frames for o in outcomes)
    seconds = sum(o.seconds for o in outcomes)
    tail = f"; {len(failures)} of {total} videos skipped" if failures else ""
    if journal.resumed:
        tail += f"; {len(journal.resumed)} finished earlier (resumed)"
    where = f" -> {written}" if written is not None else ""
    runner.say(f"{len(outcomes)} video(s), {frames} frames in {seconds:.1f} s "
               f"({frames / seconds if seconds > 0 else 0:.1f} frames/s), "
               f"{len(results)} results{where}{tail}")
    for o in outcomes:
        if o.overlay is not None:
            runner.say(f"overlay: {o.overlay}")
        if o.contact_sheet is not None:
            runner.say(f"contact sheet: {o.contact_sheet}")
    if failures:
        names = ", ".join(j.name for j, _ in failures)
        print(f"dvis-trt: {len(failures)} of {total} videos were skipped: {names}",
              file=sys.stderr, flush=True)
    if secondary:
        names = ", ".join(j.name for j, _ in secondary)
        print(f"dvis-trt: {len(secondary)} overlay(s) could not be written ({names}); the "
              "results of those videos are in the results file", file=sys.stderr, flush=True)
    return summary


def _one_line_error(exc: BaseException) -> str:
    """``OSError`` as its strerror (+ file name), anything else as ``Type: message``, one line."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:300]
