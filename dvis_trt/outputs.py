"""Output safety: the one rule every writing command follows, our bundle marker, temporaries.

Every command that writes (``run``, ``export``, ``build``, ``bench``, ``check``, ``demo``) calls
:func:`check_outputs` with the paths it will write and the paths it reads, *before* it changes
anything:

* an output may never be, or be inside, anything the command reads. Paths are compared after
  resolving symlinks (``os.path.realpath``) *and* by file identity (``st_dev``/``st_ino``), so a
  hard link or a symlink to an input is caught too; a folder output (a bundle, an engine folder)
  may not contain an input either (replacing the folder would delete it);
* a folder is replaced only when it carries our own marker (:data:`BUNDLE_MARKER`: a JSON file
  with our format id :data:`MARKER_FORMAT` and the list of entries we wrote), and then only the
  entries it lists are ever deleted (:func:`owned_entries`): files a user put beside a bundle
  survive a re-export.

A refusal is one line (:class:`OutputRefused`, a :class:`~dvis_trt.errors.InputError`)
and nothing has been changed.

Temporaries: :func:`temp_path` names them ``.<name>.dvis-trt-tmp-<pid>-<rand><suffix>`` in the
destination folder (same file system, so the final rename is atomic), shortened to fit the
file system's name limit (255 bytes); :func:`clean_stale_temps` removes the ones whose process
is gone (a killed run), and only those.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from dvis_trt.errors import InputError

__all__ = ["OutputRefused", "BUNDLE_MARKER", "MARKER_FORMAT", "TEMP_TAG", "NAME_MAX",
           "check_outputs", "temp_path", "clean_stale_temps", "parse_temp_name", "write_marker",
           "read_marker", "owned_entries", "same_file", "OUTPUT_TAG", "refuse_foreign_file",
           "is_our_results_json"]

PathLike = Union[str, "os.PathLike[str]"]

#: The marker file a folder written by ``dvis-trt export`` carries.
BUNDLE_MARKER = ".dvis-trt-bundle"
#: Its format id: a file of that name with any other content is not ours.
MARKER_FORMAT = "dvis-trt-bundle/1"
#: What our files carry where their format has room for it (video ``comment`` metadata, PNG
#: ``Software`` text): an existing file is written over only when it is recognisably ours.
OUTPUT_TAG = "dvis-trt"
#: The tag in every temporary name.
TEMP_TAG = "dvis-trt-tmp"
#: Longest file name (bytes) on the file systems we write to (ext4, xfs, btrfs, APFS, NTFS).
NAME_MAX = 255
#: Folder-walk cap when looking for hard links of an output inside input folders.
_WALK_CAP = 200_000

_TEMP_RE = re.compile(r"^\.(?P<name>.*)\." + re.escape(TEMP_TAG) +
                      r"-(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})(?P<rest>.*)$", re.S)


class OutputRefused(InputError):
    """An output path that would destroy something the command reads, or a folder not ours."""


# ---------------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------------
def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def _ident(p: PathLike) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one existing file or folder (symlinks followed, hard links
    compared by ``st_dev``/``st_ino``)."""
    ia = _ident(a)
    return ia is not None and ia == _ident(b)


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def _walk_idents(folder: Path, cap: int = _WALK_CAP) -> Dict[Tuple[int, int], Path]:
    out: Dict[Tuple[int, int], Path] = {}
    for root, dirs, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            i = _ident(p)
            if i is not None:
                out[i] = p
            if len(out) >= cap:
                return out
    return out


def check_outputs(outputs: Sequence[Tuple[str, PathLike]], inputs: Iterable[Tuple[str, PathLike]],
                  *, folders: Sequence[str] = ()) -> None:
    """Refuse outputs that are, or are inside, an input; folder outputs that hold an input.

    Args:
        outputs: ``(label, path)`` of every path the command will create or replace (label: the
            option that named it, e.g. ``"--output"``). Missing paths are fine.
        inputs: ``(label, path)`` of everything the command reads: files (video, checkpoint,
            config, dataset json, class-names file, plugin library) and folders (bundle,
            frame folders, dataset image root). Missing inputs are skipped.
        folders: labels of outputs that are folders the command fills or replaces (an input
            inside them is refused as well).
    Raises:
        OutputRefused: the first conflict, in one line (what, which input, what to do).
    """
    ins: List[Tuple[str, Path, Path, Optional[Tuple[int, int]], bool]] = []
    for label, p in inputs:
        if p is None:
            continue
        raw = Path(os.fspath(p))
        ident = _ident(raw)
        ins.append((label, raw, _real(raw), ident, raw.is_dir()))
    walked: Dict[Path, Dict[Tuple[int, int], Path]] = {}
    for olabel, o in outputs:
        if o is None:
            continue
        oraw = Path(os.fspath(o))
        oreal = _real(oraw)
        oid = _ident(oraw)
        try:
            nlink = os.stat(oraw).st_nlink
        except OSError:
            nlink = 0
        for ilabel, iraw, ireal, iid, is_dir in ins:
            what = None
            if oreal == ireal or (oid is not None and oid == iid):
                what = "is"
            elif is_dir and _inside(oreal, ireal):
                what = "is inside"
            elif olabel in folders and _inside(ireal, oreal):
                what = "contains"
            elif is_dir and nlink > 1 and oid is not None and not oraw.is_dir():
                idents = walked.get(ireal)
                if idents is None:
                    idents = walked[ireal] = _walk_idents(ireal)
                if oid in idents:
                    raise OutputRefused(
                        f"{olabel} {oraw} is a hard link of {idents[oid]}, which {ilabel} "
                        f"{iraw} reads; choose another path (nothing was changed)")
            if what == "contains":
                raise OutputRefused(
                    f"{olabel} {oraw} contains {ilabel} {iraw}, which this command reads; "
                    "writing there could replace it: choose another folder (nothing was changed)")
            if what is not None:
                raise OutputRefused(
                    f"{olabel} {oraw} {what} {ilabel} {iraw}, which this command reads; "
                    "choose another path (nothing was changed)")
    seen: Dict[Path, str] = {}
    for olabel, o in outputs:
        if o is None:
            continue
        r = _real(o)
        if r in seen:
            raise OutputRefused(f"{olabel} {o} is also the {seen[r]} path; give each output its "
                                "own path (nothing was changed)")
        seen[r] = olabel


# ---------------------------------------------------------------------------------------------
# the bundle marker
# ---------------------------------------------------------------------------------------------
def _plain_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name)


def write_marker(folder: PathLike, entries: Iterable[str], *, kind: str = "bundle") -> Path:
    """Write :data:`BUNDLE_MARKER` into ``folder`` listing the top-level ``entries`` we wrote."""
    names = sorted({e for e in entries if _plain_name(e) and e != BUNDLE_MARKER})
    path = Path(folder) / BUNDLE_MARKER
    path.write_text(json.dumps({"format": MARKER_FORMAT, "kind": kind, "entries": names},
                               indent=1) + "\n", encoding="utf-8")
    return path


def read_marker(folder: PathLike) -> Optional[Set[str]]:
    """Entries listed by ``folder``'s marker, or None when there is no valid marker of ours
    (missing, unreadable, another format, or listing anything but plain names)."""
    path = Path(folder) / BUNDLE_MARKER
    try:
        if not path.is_file() or path.stat().st_size > (1 << 20):
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(_plain_name(e) for e in entries):
        return None
    return set(entries) | {BUNDLE_MARKER}


def _legacy_bundle_entries(folder: Path) -> Optional[Set[str]]:
    """Entries of a bundle written before the marker existed: a ``manifest.json`` that parses
    as ours (format_version, stages with files) -> the files it lists. None otherwise."""
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("format_version"), int) or \
            not isinstance(data.get("stages"), dict) or not isinstance(data.get("config"), dict):
        return None
    names = {"manifest.json"}
    for s in data["stages"].values():
        f = s.get("file") if isinstance(s, dict) else None
        if not _plain_name(f):
            return None
        names.add(f)
    const = data.get("constants")
    if isinstance(const, dict) and _plain_name(const.get("file")):
        names.add(const["file"])
    return names


def owned_entries(folder: PathLike, *, label: str = "--output",
                  extra_owned: Sequence[str] = ()) -> Set[str]:
    """Top-level entries of ``folder`` that a re-export may replace or delete.

    * missing or empty folder: nothing (all of it is new);
    * a folder with our marker: the entries it lists (plus ``extra_owned`` that exist, e.g.
      ``engines`` written by ``dvis-trt build``), nothing else;
    * a bundle from before the marker (a ``manifest.json`` of ours): the files it lists.

    Raises:
        OutputRefused: ``folder`` is a file, or a non-empty folder that is not ours.
    """
    f = Path(folder)
    if f.is_symlink():  # replacing it would replace the link, not the folder it names
        raise OutputRefused(f"{label} {f} is a symbolic link (to {os.readlink(f)}); give the "
                            "folder itself or a new path (nothing was changed)")
    if f.exists() and not f.is_dir():
        raise OutputRefused(f"{label} {f} exists and is not a folder; choose another path "
                            "(nothing was changed)")
    if not f.exists():
        return set()
    present = set(os.listdir(f))
    if not present:
        return set()
    owned = read_marker(f)
    if owned is None:
        owned = _legacy_bundle_entries(f)
    if owned is None:
        raise OutputRefused(
            f"{label} {f} is not empty and is not a dvis-trt bundle (no {BUNDLE_MARKER} "
            "marker); refusing to write into it: choose a new or empty folder (nothing was "
            "changed)")
    owned |= {e for e in extra_owned if e in present}
    return owned & present


# ---------------------------------------------------------------------------------------------
# temporaries
# ---------------------------------------------------------------------------------------------
def temp_path(path: PathLike, *, keep_suffix: bool = True) -> Path:
    """A recognisable temporary name next to ``path``:
    ``<folder>/.<name>.dvis-trt-tmp-<pid>-<8 hex><suffix>``.

    The name part is shortened (on a UTF-8 boundary) so the whole name fits :data:`NAME_MAX`
    bytes; the suffix (``.mp4``: writers pick the format from it) is kept."""
    p = Path(path)
    suffix = p.suffix if keep_suffix else ""
    tail = f".{TEMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    room = NAME_MAX - len(tail.encode("utf-8")) - 1
    name = p.name.encode("utf-8")[:max(room, 1)].decode("utf-8", "ignore")
    return p.with_name(f".{name}{tail}")


def parse_temp_name(name: str) -> Optional[int]:
    """The pid in a temporary name of ours, or None for any other name."""
    m = _TEMP_RE.match(name)
    return int(m.group("pid")) if m else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as exc:  # pragma: no cover - other platforms
        return exc.errno != errno.ESRCH
    return True


def _newest_mtime(p: Path, is_dir: bool) -> float:
    try:
        newest = p.lstat().st_mtime
        if is_dir:
            for e in os.scandir(p):
                newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return time.time()
    return newest


def clean_stale_temps(folder: PathLike, *, min_age_s: float = 60.0) -> List[Path]:
    """Delete our temporaries in ``folder`` left by processes that no longer run.

    Only names of the :func:`temp_path` form count, only when their pid is not alive on this
    machine, and only when nothing in them changed for ``min_age_s`` seconds (a process of
    another container sharing the folder has another pid space: a temporary it is still
    writing keeps changing). Anything else (a user's dot-file, a temporary of a run still
    going) is left alone. Returns the removed paths. Errors (no permission, folder gone) are
    ignored.
    """
    removed: List[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        pid = parse_temp_name(e.name)
        if pid is None or _pid_alive(pid):
            continue
        p = Path(e.path)
        is_dir = e.is_dir(follow_symlinks=False)
        if time.time() - _newest_mtime(p, is_dir) < min_age_s:
            continue
        try:
            if is_dir:
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            continue
    return removed


# ---------------------------------------------------------------------------------------------
# replacing a folder of ours
# ---------------------------------------------------------------------------------------------
#: Entries moved in last (the manifest is the bundle's commit point, the marker comes with it).
_LAST = ("manifest.json", BUNDLE_MARKER)


def commit_folder(new: PathLike, dest: PathLike, owned: Set[str], *,
                  label: str = "--output") -> None:
    """Move the finished folder ``new`` to ``dest``, deleting only ``owned`` entries of ``dest``.

    * ``dest`` missing or empty: one rename;
    * ``dest`` holds only ``owned`` entries: the folders are swapped (one atomic
      ``renameat2(RENAME_EXCHANGE)`` on Linux, else rename aside + rename in) and the old one
      deleted;
    * ``dest`` also holds entries that are not ours: entry by entry (the old owned entries
      are moved aside first, the manifest and marker last, rolled back on failure); the
      foreign entries are never touched.

    ``owned`` comes from :func:`owned_entries`. ``new`` and ``dest`` must be on one file system
    (callers create ``new`` beside ``dest`` with :func:`temp_path`).

    Raises:
        OutputRefused: a new entry would replace a foreign entry of the same name (nothing moved).
    """
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.rename(new, dest)
        return
    present = set(os.listdir(dest))
    if not present:
        os.rmdir(dest)
        os.rename(new, dest)
        return
    if present <= owned:
        if _exchange(new, dest):
            shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old folder
            return
        old = temp_path(dest.with_name(dest.name + ".old"), keep_suffix=False)
        os.rename(dest, old)
        try:
            os.rename(new, dest)
        except BaseException:
            os.rename(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    incoming = os.listdir(new)
    clash = sorted(e for e in incoming if e in present and e not in owned)
    if clash:
        raise OutputRefused(f"{label} {dest} holds '{clash[0]}', which is not ours and would be "
                            "replaced; move it or choose another folder (nothing was changed)")
    trash = temp_path(dest.with_name(dest.name + ".old"), keep_suffix=False)
    trash.mkdir()
    aside: List[str] = []
    moved_in: List[str] = []
    order = sorted(incoming, key=lambda e: (e in _LAST, _LAST.index(e) if e in _LAST else 0, e))
    try:
        for e in sorted(owned & present, key=lambda e: e not in _LAST):  # manifest out first
            os.rename(dest / e, trash / e)
            aside.append(e)
        for e in order:
            os.rename(new / e, dest / e)
            moved_in.append(e)
    except BaseException:
        for e in reversed(moved_in):
            os.rename(dest / e, new / e)
        for e in reversed(aside):
            os.rename(trash / e, dest / e)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}) failed: {os.strerror(err)}")


# ---------------------------------------------------------------------------------------------
# existing files at an output path
# ---------------------------------------------------------------------------------------------
_RESULTS_RE = re.compile(r'^\[\s*(\]|\{"video_id": -?\d+, "score": [^,]+, "category_id": )')


def is_our_results_json(path: PathLike) -> bool:
    """True for a YouTube-VIS results file as ``dvis-trt run`` writes it (``[]``, or a list
    whose first item starts ``{"video_id": .., "score": .., "category_id": ..``)."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            head = f.read(256)
    except OSError:
        return False
    return bool(_RESULTS_RE.match(head))


def refuse_foreign_file(path: PathLike, label: str, recognise) -> None:
    """Refuse to write over an existing file at ``path`` unless ``recognise(path)`` says it is
    one of ours (a re-run replacing its own output). Missing paths are fine.

    Raises:
        OutputRefused: one line; nothing was changed.
    """
    p = Path(path)
    if not (p.exists() or p.is_symlink()) or p.is_dir():
        return
    if not recognise(p):
        raise OutputRefused(f"{label} {p} exists and was not written by dvis-trt; remove it or "
                            "choose another name (nothing was changed)")
