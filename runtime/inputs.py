"""What ``dvis-trt run`` is asked to read and write: input discovery (video files, frame
folders, a YouTube-VIS dataset json), class names, overlay paths, and the output checks done
before anything is decoded."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from dvis_trt.errors import InputError

from .video import IMAGE_EXTENSIONS, VideoSource, load_ytvis_videos, natural_sort_key, open_source

__all__ = ["VideoJob", "discover_inputs", "load_class_names", "overlay_paths", "check_outputs"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class VideoJob:
    """One video to run.

    Attributes:
        name: display name (file stem, frame-folder name, or the dataset's folder name); also
            names its overlay file in a batch.
        video_id: the ``video_id`` its results carry (the dataset's id for ``--ytvis-json``,
            else 1, 2, ... in the order given).
        path: the file or folder, for messages.
        opener: ``() -> VideoSource``; opening probes the video (raises :class:`InputError`).
    """

    name: str
    video_id: int
    path: Optional[Path]
    opener: Callable[[], VideoSource]

    def open(self) -> VideoSource:
        return self.opener()


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
               for p in folder.iterdir() if p.is_file())


def discover_inputs(paths: Sequence[PathLike], ytvis_json: Optional[PathLike] = None,
                    ytvis_root: Optional[PathLike] = None, *, strict: bool = True,
                    fps: Optional[float] = None) -> Tuple[List[VideoJob], Optional[List[int]]]:
    """Turn command-line inputs into :class:`VideoJob` s (nothing is decoded yet).

    Args:
        paths: video files (anything FFmpeg reads), folders of frames, folders whose
            sub-folders are frame folders (a YouTube-VIS ``JPEGImages/`` root: one video per
            sub-folder, natural order), folders of video files (one video per file with a
            video suffix, natural order), or single images (1-frame videos).
        ytvis_json, ytvis_root: a YouTube-VIS / OVIS dataset json and its image root; every
            video of the json is added (``video_id`` from the json, sorted by id).
        strict: strict decoding of video files (see :class:`AVVideoSource`).
        fps: frame rate attached to frame folders (timestamps only).
    Returns:
        (jobs, category_ids): ``category_ids`` = the dataset's category ids in contiguous
        order (sorted ids, official ``thing_dataset_id_to_contiguous_id``) when a dataset json
        is given, else None (labels map to ``label + 1``).
    Raises:
        InputError: no inputs at all, ``--ytvis-json`` without ``--ytvis-root`` (or the
        reverse), an unreadable dataset json. A missing or unreadable *video* is not raised
        here: its job fails when opened, so a batch can report it and go on.
    """
    if (ytvis_json is None) != (ytvis_root is None):
        raise InputError("--ytvis-json and --ytvis-root go together: pass the dataset json and "
                         "the folder its file_names are relative to (e.g. valid/JPEGImages)")
    if not paths and ytvis_json is None:
        raise InputError("no input: pass video files / frame folders, or --ytvis-json with "
                         "--ytvis-root")
    jobs: List[VideoJob] = []

    def add(name: str, path: Optional[Path], opener: Callable[[], VideoSource]) -> None:
        jobs.append(VideoJob(name=name, video_id=len(jobs) + 1, path=path, opener=opener))

    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not _has_images(p):
            subs = sorted((d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")
                           and _has_images(d)), key=lambda d: natural_sort_key(d.name))
            if subs:  # a JPEGImages/ root: one video per sub-folder
                for d in subs:
                    add(d.name, d, lambda d=d: open_source(d, fps=fps))
                continue
            from .cli_args import VIDEO_SUFFIXES
            vids = sorted((f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and f.suffix.lower() in VIDEO_SUFFIXES),
                          key=lambda f: natural_sort_key(f.name))
            if vids:  # a folder of video files: one video per file
                for f in vids:
                    add(f.stem, f, lambda f=f: open_source(f, strict=strict, fps=fps))
                continue
        name = p.name if p.is_dir() else p.stem
        add(name or str(p), p, lambda p=p: open_source(p, strict=strict, fps=fps))

    category_ids: Optional[List[int]] = None
    if ytvis_json is not None:
        if paths:
            raise InputError("pass either input videos or --ytvis-json, not both (results of a "
                             "dataset run carry the dataset's video ids)")
        videos = load_ytvis_videos(ytvis_json, ytvis_root)
        if not videos:
            raise InputError(f"'{ytvis_json}' lists no videos")
        for v in videos:
            jobs.append(VideoJob(name=v.name, video_id=v.id,
                                 path=v.file_names[0].parent if v.file_names else None,
                                 opener=lambda v=v: v.open(fps=fps)))
        category_ids = _dataset_category_ids(ytvis_json)
    return jobs, category_ids


def _dataset_category_ids(json_path: PathLike) -> Optional[List[int]]:
    """Sorted category ids of a YouTube-VIS json (``categories[*].id``), or None if absent."""
    try:
        with open(json_path, "r", encoding="utf-8") as f:
            cats = json.load(f).get("categories")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(cats, list) or not cats:
        return None
    try:
        return sorted(int(c["id"]) for c in cats)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"'{json_path}': 'categories' entries need an integer 'id'") from None


def load_class_names(spec: Optional[str], num_classes: int,
                     bundle_names: Optional[Sequence[str]] = None) -> Optional[List[str]]:
    """Class names for labels: ``--class-names`` if given, else the bundle's config metadata.

    Args:
        spec: ``"a,b,c"``, or a file: one name per line (blank lines and ``#`` comments
            skipped), or a ``.json`` list of names (or of ``{"id", "name"}`` objects in
            contiguous order).
        num_classes: K; the list must have exactly K names.
        bundle_names: ``manifest.config.class_names``.
    Returns:
        K names, or None (labels are then shown as ``class <id>``).
    Raises:
        InputError: a file that cannot be read, or the wrong number of names.
    """
    if spec is None:
        return list(bundle_names) if bundle_names else None
    p = Path(spec)
    where = f"--class-names {spec!r}"
    if p.is_file():
        where = f"class-names file '{p}'"
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {where}: {exc}") from None
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise InputError(f"{where} is not valid JSON: {exc}") from None
            if isinstance(data, dict) and "categories" in data:
                data = sorted(data["categories"], key=lambda c: int(c["id"]))
            if not isinstance(data, list):
                raise InputError(f"{where} must hold a JSON list of names")
            names = [str(d["name"]) if isinstance(d, dict) else str(d) for d in data]
        else:
            names = [ln.strip() for ln in text.splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
    else:
        if os.sep in spec or spec.endswith((".txt", ".json")):
            raise InputError(f"class-names file '{spec}' does not exist; pass a file or a "
                             f"comma-separated list")
        names = [n.strip() for n in spec.split(",")]
    if len(names) != num_classes or any(not n for n in names):
        raise InputError(f"{where} gives {len(names)} names but the bundle has {num_classes} "
                         f"classes; give exactly one non-empty name per class, in class order")
    return names


def overlay_paths(overlay: Optional[PathLike], jobs: Sequence[VideoJob]) -> Dict[int, Path]:
    """Overlay file per job index: the path itself for one video; for several,
    ``<folder>/<stem>_<video name><suffix>`` (or ``<folder>/<video name>.mp4`` when ``overlay``
    is an existing folder or ends with a path separator)."""
    if overlay is None:
        return {}
    o = Path(overlay)
    as_dir = o.is_dir() or str(overlay).endswith(("/", os.sep))
    if len(jobs) == 1 and not as_dir:
        return {0: o}
    out: Dict[int, Path] = {}
    used: Dict[str, int] = {}
    for i, job in enumerate(jobs):
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in job.name) or "video"
        # the file name must fit the file system's limit (255 bytes) with its prefix/suffix
        from dvis_trt.outputs import NAME_MAX
        room = NAME_MAX - 12 - len((".mp4" if as_dir else f"{o.stem}_{o.suffix}").encode())
        if len(base.encode()) > room:
            import hashlib
            tag = hashlib.sha1(job.name.encode()).hexdigest()[:8]
            base = base.encode()[:max(room - 9, 1)].decode("utf-8", "ignore") + "-" + tag
        n = used.get(base, 0)
        used[base] = n + 1
        if n:
            base = f"{base}_{n}"
        out[i] = (o / f"{base}.mp4") if as_dir else o.with_name(f"{o.stem}_{base}{o.suffix}")
    return out



def check_outputs(jobs: Sequence[VideoJob], output: Optional[PathLike],
                  overlays: Dict[int, Path],
                  reads: Sequence[Tuple[str, Optional[PathLike]]] = (),
                  sheets: Optional[Dict[int, Path]] = None) -> None:
    """Refuse output paths that would destroy an input or each other, and folders we cannot
    write, before any video is decoded (a long batch must not die at its very last step).

    The rule is :func:`dvis_trt.outputs.check_outputs`: no output may be, or be inside, a
    video, a frame folder, or anything in ``reads`` (the bundle, checkpoint, config file,
    dataset json and image root, class-names file), symlinks and hard links resolved.
    Temporaries of killed runs in the output folders are removed
    (:func:`dvis_trt.outputs.clean_stale_temps`).

    Raises:
        InputError: an output path is an input, two outputs share a path, or an output
            folder is not writable (read-only, no permission, full).
    """
    import tempfile

    from dvis_trt.outputs import check_outputs as check_rule, clean_stale_temps

    inputs = [("input", j.path) for j in jobs if j.path is not None]
    inputs += [(label, p) for label, p in reads if p is not None]
    outs = ([("--output", Path(output))] if output is not None else []) + \
        [("--overlay", p) for p in overlays.values()] + \
        [("--contact-sheet", p) for p in (sheets or {}).values()]
    check_rule(outs, inputs)
    from dvis_trt.outputs import is_our_results_json, refuse_foreign_file

    from .overlay import is_our_image, is_our_video
    recognise = {"--output": is_our_results_json, "--overlay": is_our_video,
                 "--contact-sheet": is_our_image}
    for label, p in outs:   # an existing file is replaced only when it is ours (a re-run)
        refuse_foreign_file(p, label, recognise[label])
    for folder in {p.resolve().parent for _, p in outs}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".dvis-trt-write-test."):
                pass
        except OSError as exc:
            raise InputError(f"cannot write into {folder}: {exc.strerror or exc}; choose "
                             "another output folder (nothing was run)") from None
        clean_stale_temps(folder)
