"""Per-video shards: every finished video is committed at once, so an interrupted or failed
collection run loses nothing and a second run picks up where the first stopped (no torch).

Layout, next to the output ``results.json``::

    results.json.shards/
        .dvis-trt-shards                     marker: this folder is ours (JSON, see MARKER_NAME)
        000001-walk_0001-1a2b3c4d.json       one finished video: results + summary + key
        000002-...

* A shard is written atomically (temporary file in the folder, fsync, rename) by
  :meth:`ShardStore.commit` as soon as its video finished — by ``dvis-trt run`` locally, and by
  the driver of ``dvis-trt run --ray`` as each actor's answer arrives (a shard is never written
  by two processes, and never half-written).
* ``results.json`` is :meth:`ShardStore.merge`: the shards' results in input order, streamed
  (one video in memory at a time), byte-identical to ``json.dumps`` of the whole list (what a
  run without shards writes).
* A shard carries a **key**: the bundle (sha256 of its ``manifest.json``, which holds every
  stage's sha256) and the options that change results (backend as requested, execution
  providers, window, clip length, memory budget, dataset categories, lenient decoding), plus
  the video's identity (path, size, mtime, ``video_id``). A later run reuses a shard only when
  both match, so a shard from another bundle or other options is redone, never mixed in.
* When every video of the run is in ``results.json``, the shard folder is removed (only our
  files; anything foreign is left alone, folder included). When some videos failed or the run
  was interrupted, it stays, and the next run with the same ``--output`` resumes (skips the
  finished videos and says how many).
* One run at a time per shard folder: the marker is locked (``flock``) while a run writes, so
  a second run with the same output is refused with one line instead of interleaving.

The official code has no counterpart (it evaluates a dataset in one process); the journal
layout follows what batch-inference tools do (Ray Data's per-block outputs, a resumable
download's ``.part`` files).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from dvis_trt.errors import InputError
from dvis_trt.fileio import _json_default, atomic_open, atomic_write_json

__all__ = ["SHARDS_SUFFIX", "MARKER_NAME", "SHARD_FORMAT", "shard_folder", "bundle_digest",
           "run_key", "key_for_run", "video_identity", "Shard", "ShardStore", "RunJournal",
           "open_journal", "resume_note"]

PathLike = Union[str, "os.PathLike[str]"]

#: the shard folder of ``results.json`` is ``results.json.shards``
SHARDS_SUFFIX = ".shards"
#: marker file that makes a shard folder recognisably ours
MARKER_NAME = ".dvis-trt-shards"
#: format tag stored in every shard and in the marker
SHARD_FORMAT = "dvis-trt-shard/1"

_SHARD_RE = re.compile(r"^\d{6}-.*-[0-9a-f]{8}\.json$")
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.json)?$")


def _is_our_temp(name: str) -> bool:
    """A temporary of :func:`dvis_trt.outputs.temp_path` (``.NAME.dvis-trt-tmp-<pid>-<rand>``)."""
    from dvis_trt.outputs import parse_temp_name
    return parse_temp_name(name) is not None


def shard_folder(output: PathLike) -> Path:
    """``results.json`` -> ``results.json.shards`` (same folder)."""
    out = Path(output)
    return out.with_name(out.name + SHARDS_SUFFIX)


def bundle_digest(bundle_root: PathLike) -> str:
    """sha256 (hex) of the bundle's ``manifest.json`` bytes; the manifest lists every stage
    file's and the constants' sha256, so this names the bundle's content. Engines built later
    (``bundle/engines/``) are covered by ``backend`` in :func:`run_key`."""
    h = hashlib.sha256()
    with open(Path(bundle_root) / "manifest.json", "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def run_key(bundle_root: PathLike, **options: Any) -> str:
    """Key of a run's shards: sha256 (hex, 16 chars) of the bundle digest and ``options``
    (JSON-serialisable values: backend, providers, window, clip_frames, memory_gb,
    category_ids, lenient, ...). Two runs that would write different bytes for a video must
    get different keys; options that only change speed (threads, workers) must not be in it."""
    payload = {"bundle": bundle_digest(bundle_root), "options": options}
    text = json.dumps(payload, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def video_identity(name: str, video_id: int, path: Optional[PathLike]) -> Dict[str, Any]:
    """What a shard must match to stand for a video: name, ``video_id`` (it is in the
    results), absolute path, and the path's size and modification time (a re-encoded video, or
    a frame folder with files added/removed, is run again). Unreadable paths give None
    fields (the video then fails when opened, as without shards)."""
    ident: Dict[str, Any] = {"name": str(name), "video_id": int(video_id), "path": None,
                             "size": None, "mtime_ns": None}
    if path is not None:
        s = str(path)
        if "://" not in s:
            p = Path(s).absolute()
            ident["path"] = str(p)
            try:
                st = p.stat()
                ident["size"], ident["mtime_ns"] = int(st.st_size), int(st.st_mtime_ns)
            except OSError:
                pass
        else:  # a URI (s3://...): its name is its identity
            ident["path"] = s
    return ident


def _safe(name: str, limit: int = 48) -> str:
    s = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return (s or "video")[:limit]


@dataclass
class Shard:
    """One committed video: ``results`` (its YouTube-VIS dicts) and ``summary`` (frames,
    seconds, size, tracks, instances, the summary line, backend, worker)."""

    path: Path
    key: str
    video: Dict[str, Any]
    summary: Dict[str, Any]
    results: List[Dict[str, Any]] = field(default_factory=list)


class ShardStore:
    """The shard folder of one output file (see the module docstring).

    Args:
        output: the merged results file (``results.json``); the folder is
            ``<output>.shards``.
        key: :func:`run_key` of this run.
    Raises:
        InputError: the folder exists but is not ours (no marker), or another run holds it.

    Use as a context manager (the lock is held until ``close``).
    """

    def __init__(self, output: PathLike, key: str):
        self.output = Path(output)
        self.folder = shard_folder(self.output)
        self.key = str(key)
        self._lock_fd: Optional[int] = None
        self.existed = self.folder.is_dir()
        marker = self.folder / MARKER_NAME
        if self.folder.exists() and not marker.is_file():
            raise InputError(f"{self.folder} exists but is not a dvis-trt shard folder (no "
                             f"{MARKER_NAME} marker); move it away or choose another --output")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            atomic_write_json(marker, {"format": SHARD_FORMAT, "tool": "dvis-trt",
                                       "output": self.output.name,
                                       "what": "one finished video per file; "
                                               f"{self.output.name} is their merge in input "
                                               "order; removed when every video is in it"},
                              indent=1)
        self._lock(marker)
        self._clean_temporaries()

    # -- lifecycle ------------------------------------------------------------------------
    def _lock(self, marker: Path) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            return
        fd = os.open(str(marker), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"another dvis-trt run is writing {self.folder} (same --output); "
                             "wait for it or choose another --output") from None
        self._lock_fd = fd

    def _clean_temporaries(self) -> None:
        """Remove temporary files a killed run left in *our* folder (we hold the lock, so no
        live writer owns them)."""
        for p in self.folder.iterdir():
            if p.is_file() and (_TMP_RE.match(p.name) or _is_our_temp(p.name)):
                try:
                    p.unlink()
                except OSError:
                    pass

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shards ----------------------------------------------------------------------------
    def shard_path(self, ident: Mapping[str, Any]) -> Path:
        """File of a video: ``<video_id:06d>-<name>-<hash of path, name, id>.json`` (stable
        across runs with other options, so a redone video replaces its old shard)."""
        h = hashlib.sha1(json.dumps([ident.get("path"), ident["name"], ident["video_id"]])
                         .encode("utf-8")).hexdigest()[:8]
        return self.folder / f"{int(ident['video_id']) % 1000000:06d}-{_safe(ident['name'])}-{h}.json"

    def load(self, ident: Mapping[str, Any], *, with_results: bool = False
             ) -> Tuple[Optional[Shard], str]:
        """The shard of a video if it can be reused: ``(shard, "")``, else ``(None, why)``
        with why = "" (none), "other key" (another bundle/options), "video changed",
        "unreadable". ``with_results``: also load the results list (else left empty)."""
        path = self.shard_path(ident)
        if not path.is_file():
            return None, ""
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != SHARD_FORMAT:
                return None, "unreadable"
        except (OSError, ValueError, AttributeError):
            return None, "unreadable"
        if data.get("key") != self.key:
            return None, "other key"
        if data.get("video") != dict(ident):
            return None, "video changed"
        return Shard(path=path, key=self.key, video=data["video"], summary=data.get("summary", {}),
                     results=data.get("results", []) if with_results else []), ""

    def scan(self, idents: Sequence[Mapping[str, Any]]) -> Tuple[Dict[int, Shard], Dict[str, int]]:
        """Which of ``idents`` (in input order) are finished: ``({index: shard}, {why: count})``
        for the reusable ones and the counts of ignored ones."""
        done: Dict[int, Shard] = {}
        ignored: Dict[str, int] = {}
        for i, ident in enumerate(idents):
            shard, why = self.load(ident)
            if shard is not None:
                done[i] = shard
            elif why:
                ignored[why] = ignored.get(why, 0) + 1
        return done, ignored

    def commit(self, ident: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
               summary: Mapping[str, Any]) -> Path:
        """Write one finished video's shard atomically (replacing an old shard of the same
        video); returns its path. Raises ``TypeError``/``ValueError`` for data that is not
        JSON (nothing is written) and ``OSError`` for a full / read-only disk."""
        path = self.shard_path(ident)
        # streamed one result at a time: json.dumps of a long video's whole results builds its
        # text in pieces first (tens of MB for 2,000 frames); the bytes are the same
        head = json.dumps({"format": SHARD_FORMAT, "key": self.key, "video": dict(ident),
                           "summary": dict(summary)}, default=_json_default, allow_nan=False)
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(head[:-1] + (", " if head != "{}" else "") + '"results": [')
            for j, item in enumerate(results):
                if j:
                    f.write(", ")
                f.write(json.dumps(item, default=_json_default, allow_nan=False))
            f.write("]}")
        return path

    def results_of(self, ident: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """The results list of a committed video (raises ``InputError`` if it vanished)."""
        shard, why = self.load(ident, with_results=True)
        if shard is None:
            raise InputError(f"the shard of '{ident['name']}' in {self.folder} disappeared or "
                             f"changed during the run ({why or 'missing'}); run again")
        return shard.results

    def merge(self, idents: Iterable[Mapping[str, Any]], output: Optional[PathLike] = None,
              *, in_memory: Optional[Sequence[Optional[Sequence[Mapping[str, Any]]]]] = None
              ) -> Path:
        """Write ``output`` (default: the store's output) atomically: the concatenation of
        the given videos' shard results, in the order given, one shard in memory at a time.
        The bytes equal ``json.dumps(all_results)`` (``", "`` between items, ``[]`` when
        empty), i.e. what :func:`~dvis_trt.runtime.results.write_results` writes.
        ``in_memory[j]``: video ``j``'s results when this process still holds them (the
        very objects its shard was written from), so its shard is not read back (a second
        copy of a long video's results, and its JSON text, would double the peak memory)."""
        out = Path(output) if output is not None else self.output
        with atomic_open(out, "w", encoding="utf-8") as f:
            f.write("[")
            first = True
            for j, ident in enumerate(idents):
                held = in_memory[j] if in_memory is not None and j < len(in_memory) else None
                for item in (held if held is not None else self.results_of(ident)):
                    if not first:
                        f.write(", ")
                    f.write(json.dumps(item, default=_json_default, allow_nan=False))
                    first = False
            f.write("]")
        return out

    def is_empty(self) -> bool:
        """True when the folder holds no shard file (only the marker, perhaps temporaries)."""
        return not any(_SHARD_RE.match(p.name) for p in self.folder.iterdir())

    def remove(self) -> bool:
        """Delete the shard folder after a complete merge: our shard files and the marker,
        then the folder if nothing else is left. Returns True when the folder is gone."""
        self._clean_temporaries()
        for p in self.folder.iterdir():
            if p.is_file() and _SHARD_RE.match(p.name):
                try:
                    p.unlink()
                except OSError:
                    pass
        leftovers = [p for p in self.folder.iterdir() if p.name != MARKER_NAME]
        if leftovers:
            return False
        self.close()
        try:
            (self.folder / MARKER_NAME).unlink()
            self.folder.rmdir()
        except OSError:
            return False
        return True


def resume_note(store: ShardStore, skipped: int, total: int, ignored: Mapping[str, int]) -> str:
    """One line for the start of a resumed run, e.g. ``resume: 2 of 5 videos already finished
    in results.json.shards (skipped; --no-resume redoes them); 1 shard from another
    bundle/options redone``."""
    parts = [f"resume: {skipped} of {total} video(s) already finished in {store.folder.name} "
             "(skipped; --no-resume redoes them)"]
    if ignored.get("other key"):
        parts.append(f"{ignored['other key']} shard(s) from another bundle/options redone")
    if ignored.get("video changed"):
        parts.append(f"{ignored['video changed']} shard(s) of changed videos redone")
    if ignored.get("unreadable"):
        parts.append(f"{ignored['unreadable']} unreadable shard(s) redone")
    return "; ".join(parts)

def key_for_run(bundle_root: PathLike, *, backend: str, providers: Optional[str], window: int,
                clip_frames: Any, memory_gb: float, category_ids: Optional[Sequence[int]],
                **extra: Any) -> str:
    """:func:`run_key` from the run options that can change a video's results (the same
    function for the local run and ``--ray``, so either can resume the other's shards).
    ``memory_gb`` only counts with ``clip_frames="auto"`` (it picks the clip length)."""
    return run_key(bundle_root, backend=str(backend), providers=providers, window=int(window),
                   clip_frames=clip_frames,
                   memory_gb=float(memory_gb) if clip_frames == "auto" else None,
                   category_ids=list(category_ids) if category_ids else None,
                   **{k: v for k, v in sorted(extra.items())})


class RunJournal:
    """The shard side of one collection run, shared by the local run and the ``--ray``
    driver: which videos are already finished, committing each new one, and writing the
    merged output at the end.

    Args:
        store: the output's :class:`ShardStore`, or None (no ``--output``: nothing to commit;
            :meth:`write` then does nothing).
        idents: :func:`video_identity` of every video, in input order.
        resume: True / None (resume when shards exist) skip videos with a matching shard;
            False redoes every video (their shards are replaced as they finish).
        say: where the resume line goes (e.g. ``Runner.say``).

    As a context manager: when the block raises (an aborting error, Ctrl-C), one stderr line
    says how many finished videos are kept and how to resume; a shard folder this run created
    and never used is removed.
    """

    def __init__(self, store: Optional[ShardStore], idents: Sequence[Mapping[str, Any]],
                 resume: Optional[bool] = None, say=None):
        self.store = store
        self.idents = [dict(x) for x in idents]
        self.resumed: Dict[int, Shard] = {}
        self.committed: Dict[int, Optional[List[Dict[str, Any]]]] = {}
        self.ignored: Dict[str, int] = {}
        if store is not None and resume is not False and store.existed:
            self.resumed, self.ignored = store.scan(self.idents)
            if (self.resumed or self.ignored) and say is not None:
                say(resume_note(store, len(self.resumed), len(self.idents), self.ignored))

    # -- per video -----------------------------------------------------------------------
    def done(self, index: int) -> bool:
        """True when video ``index`` is finished from an earlier run (skip it)."""
        return index in self.resumed

    def commit(self, index: int, results: Sequence[Mapping[str, Any]],
               summary: Mapping[str, Any], *, keep: bool = True) -> Optional[Path]:
        """Commit video ``index`` (atomic shard write); ``keep``: also keep ``results`` in
        memory for :meth:`results` (the local run has them anyway)."""
        self.committed[index] = list(results) if keep else None
        if self.store is None:
            return None
        return self.store.commit(self.idents[index], results, summary)

    @property
    def finished(self) -> List[int]:
        """Indices of every finished video (resumed or committed now), in input order."""
        return sorted(set(self.resumed) | set(self.committed))

    def results(self) -> List[Dict[str, Any]]:
        """Every finished video's results, in input order (resumed ones read from their
        shards)."""
        out: List[Dict[str, Any]] = []
        for i in self.finished:
            got = self.committed.get(i)
            if got is None:
                got = self.store.results_of(self.idents[i]) if self.store is not None else []
            out.extend(got)
        return out

    def write(self, output: Optional[PathLike],
              results: Optional[Sequence[Mapping[str, Any]]] = None) -> Optional[Path]:
        """Write the merged ``output`` (atomically): from the shards when there is a store
        (then the shard folder is removed if every video is in it), else ``results``."""
        if output is None:
            return None
        if self.store is None:
            from .results import write_results

            return write_results(output, list(results or []))
        written = self.store.merge([self.idents[i] for i in self.finished], output,
                                   in_memory=[self.committed.get(i) for i in self.finished])
        if len(self.finished) == len(self.idents):
            self.store.remove()
        return written

    def __enter__(self) -> "RunJournal":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        store = self.store
        if store is None:
            return
        try:
            if exc_type is not None:
                if self.committed or self.resumed:
                    print(f"dvis-trt: {len(self.finished)} finished video(s) are kept in "
                          f"{store.folder}; run the same command again to resume",
                          file=sys.stderr, flush=True)
                elif not store.existed and store.is_empty():
                    store.remove()
        finally:
            store.close()


def open_journal(output: Optional[PathLike], key: str, idents: Sequence[Mapping[str, Any]],
                 resume: Optional[bool] = None, say=None) -> RunJournal:
    """:class:`RunJournal` for ``output`` (None: a journal without a store)."""
    store = ShardStore(output, key) if output is not None else None
    try:
        return RunJournal(store, idents, resume, say)
    except BaseException:
        if store is not None:
            store.close()
        raise
