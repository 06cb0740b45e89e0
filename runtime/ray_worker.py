"""``dvis-trt run ... --ray``: the bundle on the workers and the actor that runs one video.

The bundle is shipped once (its files in the object store, unpacked once per node into a local
cache) or read from a path every node mounts. :class:`VideoWorker` is the Ray Data callable class
of the actor pool: it loads the bundle once and runs the unchanged per-video pipeline
(:meth:`~dvis_trt.runtime.runner.Runner.run_source`); the driver
(:mod:`~dvis_trt.runtime.ray_runner`) commits what it returns. The official code has no
counterpart.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dvis_trt.errors import DvisTrtError, InputError

__all__ = ["VideoWorker", "ship_bundle", "materialize_bundle"]


# --------------------------------------------------------------------------------------------
# the bundle on the workers
# --------------------------------------------------------------------------------------------
def _bundle_files(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and
                  not any(part.startswith(".") for part in p.relative_to(root).parts))


def _bundle_fingerprint(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    with open(root / "manifest.json", "rb") as f:
        h.update(f.read())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def ship_bundle(ray, root: Path) -> Dict[str, Any]:
    """Put every bundle file in the object store once: ``{"fingerprint", "files": {relpath:
    ObjectRef}}`` (workers fetch each file once per node, see :func:`materialize_bundle`)."""
    files = _bundle_files(root)
    refs = {p.relative_to(root).as_posix(): ray.put(p.read_bytes()) for p in files}
    return {"fingerprint": _bundle_fingerprint(root, files), "files": refs,
            "name": root.name}


def materialize_bundle(shipped: Dict[str, Any]) -> Path:
    """On a worker: the shipped bundle unpacked in this node's cache
    (``<tmp>/dvis-trt-bundles/<name>-<fingerprint>/``), once per node (the first actor
    unpacks into a temporary folder and renames it; the others reuse it)."""
    import ray

    cache = Path(tempfile.gettempdir()) / "dvis-trt-bundles"
    final = cache / f"{shipped['name']}-{shipped['fingerprint']}"
    if (final / "manifest.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, ref in shipped["files"].items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(ray.get(ref))
        try:
            os.rename(tmp, final)
        except OSError:  # another actor on this node won the race
            if not (final / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# the actor
# --------------------------------------------------------------------------------------------
_OUT_FIELDS = ("index", "status", "message", "exit_code", "results", "summary", "worker",
               "frames", "seconds")


def _exit_code_of(exc: BaseException) -> int:
    """The exit code the local run's CLI gives for this exception (``runtime/cli.py``)."""
    if isinstance(exc, DvisTrtError):
        return exc.exit_code
    if isinstance(exc, MemoryError):
        return 3
    return 70


class VideoWorker:
    """Ray Data callable class: one per actor; loads the bundle once, then runs one video per
    call (``batch_size=1``) through :meth:`~dvis_trt.runtime.runner.Runner.run_source`.

    Args:
        spec: picklable dict: ``bundle`` (a path, or :func:`ship_bundle` 's dict), ``runner``
            (Runner keyword arguments), ``discover`` (the local inputs to rediscover),
            ``strict``, ``total``, ``stage_retries``, ``registry`` (an actor counting attempts,
            or None), ``test_exit_on``.
    Each call returns one row per video: ``status`` ok / bad_input / error / init_error, the
    results as JSON text (parsed and committed by the driver), the shard summary, the worker
    (``host:pid``), frames and seconds.
    """

    def __init__(self, spec: Dict[str, Any]):
        self.spec = spec
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.init_error: Optional[Tuple[str, int]] = None
        self.runner = None
        self.jobs: List[Any] = []
        #: FFmpeg decoder threads: the actor's CPUs (FFmpeg's own choice is every core of the
        #: node, which oversubscribes a node shared by several actors)
        self._decode_threads = max(1, int(spec.get("cpus", 1)))
        try:
            self._load()
        except (DvisTrtError, MemoryError, OSError, RuntimeError, ValueError) as exc:
            self.init_error = (f"{type(exc).__name__}: {exc}" if not isinstance(exc, DvisTrtError)
                               else str(exc), _exit_code_of(exc))

    def _load(self) -> None:
        from .inputs import discover_inputs
        from .runner import Runner

        bundle = self.spec["bundle"]
        root = materialize_bundle(bundle) if isinstance(bundle, dict) else Path(bundle)
        opts = dict(self.spec["runner"])
        if isinstance(bundle, dict):
            opts["verify"] = False  # unpacked from the driver's verified copy
        self.runner = Runner(root, opts.pop("backend"), quiet=True, **opts)
        d = self.spec["discover"]
        strict = self.spec["strict"]
        if d.get("per_input"):
            for raw in d["inputs"]:
                self.jobs.extend(discover_inputs([raw], strict=strict)[0])
        elif d["inputs"] or d["ytvis_json"]:
            self.jobs = discover_inputs(d["inputs"], d["ytvis_json"], d["ytvis_root"],
                                        strict=strict)[0]

    # -- one video ---------------------------------------------------------------------------
    def _job(self, row: Dict[str, Any]):
        from .inputs import VideoJob
        from .video import open_source

        if row["uri"]:
            uri = row["uri"]

            def open_uri():
                local = self._fetch(uri)
                try:
                    return open_source(local, strict=self.spec["strict"],
                                       threads=self._decode_threads)
                except InputError as exc:  # name the URI, not our temporary copy
                    raise InputError(str(exc).replace(str(local), uri)) from None

            return VideoJob(name=row["name"], video_id=int(row["video_id"]), path=None,
                            opener=open_uri)
        pos = int(row["local_pos"])
        if not 0 <= pos < len(self.jobs) or self.jobs[pos].name != row["name"]:
            raise InputError(f"'{row['path']}' is not the same input on worker {self.worker} "
                             "(mount the same storage at the same path on every node)")
        job = self.jobs[pos]
        job.video_id = int(row["video_id"])
        if job.path is not None and Path(job.path).is_file():  # decoder threads = our CPUs
            job.opener = lambda p=job.path: open_source(p, strict=self.spec["strict"],
                                                        threads=self._decode_threads)
        return job

    def _fetch(self, uri: str) -> Path:
        import pyarrow.fs as pafs

        try:
            fs, path = pafs.FileSystem.from_uri(uri)
            suffix = Path(path).suffix
            fd, tmp = tempfile.mkstemp(prefix="dvis-trt-input.", suffix=suffix)
            self._tmp_inputs.append(Path(tmp))
            with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
                shutil.copyfileobj(src, out, 1 << 22)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read '{uri}': {exc}") from None
        return Path(tmp)

    def _test_hook(self, name: str) -> None:
        spec = self.spec.get("test_exit_on")
        if not spec:
            return
        target, folder = spec.split(":", 1)
        folder = Path(folder)
        with open(folder / "attempts.log", "a", encoding="utf-8") as f:
            f.write(f"{name} {self.worker}\n")
        marker = folder / f"{target}.exited"
        if name == target and not marker.exists():
            marker.write_text(self.worker)
            os._exit(17)  # a worker process dying while it holds the video

    def _run_one(self, row: Dict[str, Any]) -> Dict[str, Any]:
        from dvis_trt.fileio import _json_default

        out = {k: None for k in _OUT_FIELDS}
        out.update(index=int(row["index"]), status="ok", message="", exit_code=0, results="",
                   summary="", worker=self.worker, frames=0, seconds=0.0)
        if self.init_error is not None:
            out.update(status="init_error", message=self.init_error[0],
                       exit_code=self.init_error[1])
            return out
        registry = self.spec.get("registry")
        if registry is not None:  # waited for: an attempt is counted even if we die next
            import ray

            ray.get(registry.started.remote(int(row["index"]), self.worker))
        self._test_hook(row["name"])
        self._tmp_inputs: List[Path] = []
        attempts = 0
        try:
            while True:
                try:
                    job = self._job(row)
                    t0 = time.perf_counter()
                    res = self.runner.run_source(job, job.open(), row["overlay"] or None)
                    break
                except InputError as exc:
                    out.update(status="bad_input", message=str(exc), exit_code=exc.exit_code)
                    return out
                except (DvisTrtError, MemoryError, RuntimeError, ValueError) as exc:
                    attempts += 1
                    if attempts <= int(self.spec.get("stage_retries", 1)):
                        continue  # a stage error: once more on this actor
                    out.update(status="error", message=f"{type(exc).__name__}: {exc}",
                               exit_code=_exit_code_of(exc))
                    return out
        finally:
            for p in self._tmp_inputs:
                try:
                    p.unlink()
                except OSError:
                    pass
        line = self.runner.summary_line(res, int(row["index"]), int(self.spec["total"]))
        out.update(results=json.dumps(res.results, default=_json_default, allow_nan=False),
                   summary=json.dumps(res.summary(line)), frames=int(res.result.num_frames),
                   seconds=float(time.perf_counter() - t0))
        return out

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist() if hasattr(batch, "to_pylist") else \
            [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        outs = [self._run_one(r) for r in rows]
        schema = pa.schema([("index", pa.int64()), ("status", pa.string()),
                            ("message", pa.large_string()), ("exit_code", pa.int64()),
                            ("results", pa.large_string()), ("summary", pa.large_string()),
                            ("worker", pa.string()), ("frames", pa.int64()),
                            ("seconds", pa.float64())])
        return pa.Table.from_pylist(outs, schema=schema)


class _AttemptRegistry:
    """Counts how often each video was started (a retry after a worker died shows as 2)."""

    def __init__(self):
        self.counts: Dict[int, int] = {}
        self.workers: Dict[int, List[str]] = {}

    def started(self, index: int, worker: str) -> None:
        self.counts[index] = self.counts.get(index, 0) + 1
        self.workers.setdefault(index, []).append(worker)

    def snapshot(self) -> Tuple[Dict[int, int], Dict[int, List[str]]]:
        return self.counts, self.workers
