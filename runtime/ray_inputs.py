"""``dvis-trt run ... --ray``: the inputs as video references (the driver's first step).

Local paths (made absolute, so every node of a cluster that mounts the same storage finds them),
frame folders, a YouTube-VIS json, or URIs that pyarrow reads (``s3://bucket/videos/``: the video
files in it) become :class:`VideoRef` rows; ``--ray [ADDRESS]`` is told apart from an input here.
The actor is in :mod:`~dvis_trt.runtime.ray_worker`, the driver in
:mod:`~dvis_trt.runtime.ray_runner`. The official code has no counterpart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dvis_trt.errors import DependencyError, InputError

from .cli_args import VIDEO_SUFFIXES  # file suffixes taken as videos (a URI folder too)

__all__ = ["RAY_HINT", "TEST_EXIT_ENV", "VIDEO_SUFFIXES", "VideoRef", "is_uri", "split_address",
           "collect_inputs"]


#: the one line a missing Ray gives
RAY_HINT = "pip install 'dvis-trt[ray]'"
#: test hook: ``"<video name>:<folder>"`` makes an actor exit (``os._exit``) the first time it
#: holds that video (a marker file in <folder> remembers it); every attempt is appended to
#: ``<folder>/attempts.log``. Read by the driver and handed to the actors.
TEST_EXIT_ENV = "DVIS_TRT_TEST_RAY_EXIT_ON"

_ADDRESS_RE = re.compile(r"^(auto|local|(ray|rays|http|https)://\S+|[\w.-]+:\d+)$")


def _import_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise DependencyError(f"--ray needs Ray (with Ray Data), which is not installed; "
                              f"{RAY_HINT}") from None
    return ray


def is_uri(text: str) -> bool:
    """``s3://...``, ``gs://...``, ``file:///...`` — read through pyarrow, not as a path."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(text))) and not Path(text).exists()


def split_address(ray_arg: Optional[str], inputs: Sequence[str]) -> Tuple[str, List[str]]:
    """``--ray [ADDRESS]`` takes an optional value, so ``--ray clip.mp4`` would swallow an
    input: a value that is not an address (``auto``, ``local``, ``host:port``,
    ``ray://host:port``) is handed back as the first input. Returns (address, inputs)."""
    address = ray_arg or "auto"
    inputs = list(inputs)
    if not _ADDRESS_RE.match(address) or Path(address).exists():
        inputs.insert(0, address)
        address = "auto"
    return address, inputs


# --------------------------------------------------------------------------------------------
# inputs -> video references
# --------------------------------------------------------------------------------------------
@dataclass
class VideoRef:
    """One row of the collection: what a worker needs to find the video.

    ``local_pos``: position in the jobs :func:`~dvis_trt.runtime.inputs.discover_inputs` makes
    from the local inputs (the worker repeats that discovery on its node); -1 for a URI."""

    index: int
    name: str
    video_id: int
    path: str
    uri: str = ""
    local_pos: int = -1
    overlay: str = ""

    def row(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _expand_uri(uri: str) -> List[str]:
    """A URI of a file -> itself; of a folder (prefix) -> its video files, natural order."""
    from .video import natural_sort_key

    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise DependencyError(f"input '{uri}' needs pyarrow's filesystems; {RAY_HINT}") from None
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
    except Exception as exc:  # unknown scheme, credentials, network
        raise InputError(f"cannot read '{uri}': {exc}") from None
    if info.type != pafs.FileType.Directory:
        return [uri]  # a file (or missing: it then fails as a bad video, reported)
    scheme = uri.split("://", 1)[0]
    files = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=False))
             if i.type == pafs.FileType.File and i.path.lower().endswith(VIDEO_SUFFIXES)]
    if not files:
        raise InputError(f"'{uri}' holds no video files ({', '.join(VIDEO_SUFFIXES[:5])}, ...)")
    files.sort(key=lambda i: natural_sort_key(i.base_name))
    prefix = f"{scheme}:///" if scheme == "file" else f"{scheme}://"
    return [prefix + i.path.lstrip("/") if scheme == "file" else prefix + i.path for i in files]


def _uri_job(uri: str, video_id: int):
    """The driver's stand-in VideoJob of a URI (names, overlay paths; workers open it)."""
    from .inputs import VideoJob

    name = Path(uri.split("://", 1)[1]).stem or "video"

    def opener():
        raise InputError(f"'{uri}' is read by the Ray workers, not here")

    return VideoJob(name=name, video_id=video_id, path=None, opener=opener)


def collect_inputs(inputs: Sequence[str], ytvis_json: Optional[str], ytvis_root: Optional[str],
                   strict: bool):
    """Inputs -> (jobs, refs, category_ids, local_inputs).

    Local inputs go through :func:`~dvis_trt.runtime.inputs.discover_inputs` exactly as the
    local run does (same order, same ``video_id`` s), with absolute paths so workers on other
    nodes find the same files; URIs are expanded with pyarrow. Raises InputError as
    ``discover_inputs``."""
    from .inputs import discover_inputs

    local = [str(Path(p).absolute()) if not is_uri(p) else p for p in inputs]
    yj = str(Path(ytvis_json).absolute()) if ytvis_json else None
    yr = str(Path(ytvis_root).absolute()) if ytvis_root else None
    if not any(is_uri(p) for p in local):
        jobs, category_ids = discover_inputs(local, yj, yr, strict=strict)
        refs = [VideoRef(i, j.name, j.video_id, str(j.path) if j.path else "", local_pos=i)
                for i, j in enumerate(jobs)]
        return jobs, refs, category_ids, {"inputs": local, "ytvis_json": yj, "ytvis_root": yr}
    if ytvis_json:
        raise InputError("pass either input videos or --ytvis-json, not both")
    jobs, refs, local_only = [], [], []
    n_local = 0
    for raw in local:
        if is_uri(raw):
            for uri in _expand_uri(raw):
                job = _uri_job(uri, len(jobs) + 1)
                refs.append(VideoRef(len(jobs), job.name, job.video_id, uri, uri=uri))
                jobs.append(job)
        else:
            sub, _ = discover_inputs([raw], strict=strict)
            local_only.append(raw)
            for j in sub:
                j.video_id = len(jobs) + 1
                refs.append(VideoRef(len(jobs), j.name, j.video_id, str(j.path or ""),
                                     local_pos=n_local))
                n_local += 1
                jobs.append(j)
    # workers rediscover each local input on its own (one input -> its jobs, in order)
    return jobs, refs, None, {"inputs": local_only, "ytvis_json": None, "ytvis_root": None,
                              "per_input": True}
