"""Atomic file output and file hashing: the one place the project writes files from.

Every file the project writes goes through :func:`atomic_output`: the data goes to a temporary
file in the destination folder, is fsynced, then renamed over the destination, so a crash or
an error never leaves a half-written file under the real name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


def fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY
    if not directory and os.name == "nt":  # Windows fsyncs only writable handles
        flags = os.O_RDWR
    if directory:
        if os.name == "nt":  # directories cannot be fsynced on Windows
            return
        flags |= getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(str(path), flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems refuse to fsync directories: harmless
            raise
    finally:
        os.close(fd)


def _write_through(path: Path) -> Iterator[Path]:
    """:func:`atomic_output` for an existing non-regular ``path``: the writer fills a temporary
    file (system temp folder), whose bytes are then written into ``path`` (opened for writing,
    as a shell redirection would); the temporary file is always removed."""
    import tempfile  # noqa: PLC0415
    fd, name = tempfile.mkstemp(prefix=".dvis-trt-tmp-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.unlink()  # the writer creates it, as in the regular case
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written for '{path}' (temporary file "
                                    f"'{tmp.name}' was never created)")
        with open(tmp, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_output(path: PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """Write ``path`` atomically: yields a temporary path for the writer to create.

    The temporary file is ``<folder>/.<name>.dvis-trt-tmp-<pid>-<random><suffix>``
    (:func:`dvis_trt.outputs.temp_path`: within the 255-byte name limit; same folder, so the
    final rename is atomic; same suffix, so writers that pick a format by extension — PyAV,
    ``np.save``, ``onnx.save`` — still do). When the block ends normally the file is fsynced and
    renamed over ``path`` (``os.replace``) and the folder entry is fsynced. When the block
    raises, the temporary file is deleted and the exception propagates; ``path`` is untouched
    (an existing file keeps its old content). An existing ``path`` that is neither a file nor
    a folder (a device such as ``/dev/null``, a FIFO) is written through instead: the node
    itself is never replaced.

    Example::

        with atomic_output("out/results.json") as tmp:
            tmp.write_text(text)

    Args:
        path: the final file.
        make_parents: create missing parent folders.

    Raises:
        FileNotFoundError: the block ended without creating the temporary file.
        IsADirectoryError: ``path`` is an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write '{path}': it is a folder")
    if path.exists() and not path.is_file():
        # a device, FIFO or socket (``--json /dev/null``, ``/dev/stdout``): renaming over it
        # would replace the device node itself; write through it, staging in the temp folder
        yield from _write_through(path)
        return
    parent = path.parent
    if make_parents:
        parent.mkdir(parents=True, exist_ok=True)
    from dvis_trt.outputs import temp_path  # recognisable, within NAME_MAX, cleaned if orphaned
    tmp = temp_path(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written for '{path}' (temporary file "
                                    f"'{tmp.name}' was never created)")
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(parent, directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", *, encoding: Optional[str] = None,
                make_parents: bool = True):
    """``open()`` for writing, atomically (see :func:`atomic_output`). ``mode``: "w" or "wb"."""
    if mode not in ("w", "wb", "wt", "x", "xb"):
        raise ValueError(f"atomic_open writes new files only; mode {mode!r} is not supported")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_output(path, make_parents=make_parents) as tmp:
        with open(tmp, mode.replace("x", "w"), encoding=encoding) as f:
            yield f
            f.flush()


def _json_default(obj: Any):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8")
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def strict_json(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, floats, ...) with NaN and infinities as None,
    so ``json`` writes strict JSON (no ``NaN`` tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: PathLike, obj: Any, *, indent: Optional[int] = None) -> Path:
    """Serialise ``obj`` to JSON (numpy scalars/arrays, bytes and paths allowed) atomically.

    NaN/inf are rejected (they are not JSON). Returns ``Path(path)``.

    Raises:
        TypeError / ValueError: ``obj`` is not serialisable (no file is left behind).
    """
    # serialise first: an unserialisable object never creates a temporary file
    text = json.dumps(obj, default=_json_default, indent=indent, allow_nan=False)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
        if indent is not None:
            f.write("\n")
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (utf-8) to ``path`` atomically (:func:`atomic_output`). Returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`). Returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def user_cache_dir() -> Path:
    """dvis-trt's per-user cache folder (plugin builds, ORT's optimized graphs, the demo):
    ``$DVIS_TRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/dvis_trt``, else ``~/.cache/dvis_trt``.
    Not created here."""
    base = os.environ.get("DVIS_TRT_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dvis_trt"
