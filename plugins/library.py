"""Finding and building the plugin's native libraries (CMake), with a per-source-hash cache.
See :mod:`dvis_trt.plugins` for the search order."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dvis_trt.errors import DependencyError, InputError
from dvis_trt.fileio import user_cache_dir

__all__ = ["KINDS", "BuildResult", "library_filename", "source_dir", "source_hash", "cache_dir",
           "repo_build_dir", "search_dirs", "find_library", "require_library", "build",
           "ensure_library"]

#: kind -> CMake target (library base name).
KINDS = {"cpu": "dvis_msda_cpu", "cuda": "dvis_msda_cuda", "trt": "dvis_msda_trt"}

_SOURCE_GLOBS = ("CMakeLists.txt", "include/**/*.h", "src/*.cpp", "src/*.cu", "src/*.h", "tests/*.cpp")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin library kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


def library_filename(kind: str) -> str:
    """File name of a plugin library on this platform, e.g. ``libdvis_msda_cpu.so`` for ``kind="cpu"``.

    Raises ValueError for a kind other than "cpu", "cuda", "trt".
    """
    base = _check_kind(kind)
    if sys.platform == "win32":
        return f"{base}.dll"
    if sys.platform == "darwin":
        return f"lib{base}.dylib"
    return f"lib{base}.so"


def source_dir() -> Path:
    """Folder holding the plugin's ``CMakeLists.txt`` and sources (this package's folder)."""
    return Path(__file__).resolve().parent


def source_hash() -> str:
    """16 hex digits identifying the plugin sources (names of the user-cache build folders)."""
    h = hashlib.sha256()
    root = source_dir()
    files = sorted({p for g in _SOURCE_GLOBS for p in root.glob(g) if p.is_file()})
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """User cache folder for plugin builds of these sources *at this place*:
    ``<cache>/dvis_trt/plugins/<source hash>-<location hash>``.

    Keyed by content and by the source folder's path: a CMake build folder records its source
    folder, so two installs (two venvs, two checkouts) sharing one cache never configure one
    build folder from two places, and a moved or deleted checkout gets a fresh folder instead
    of a CMake cache pointing at a folder that is gone."""
    root = user_cache_dir()
    where = hashlib.sha256(os.fsencode(str(source_dir()))).hexdigest()[:8]
    return root / "plugins" / f"{source_hash()}-{where}"


def _reset_foreign_cmake_cache(bdir: Path) -> None:
    """Remove a CMake cache in ``bdir`` that was configured from another source folder (a
    ``--build-dir`` shared between checkouts, a checkout moved since): CMake refuses to
    reconfigure it. Only CMake's own files go (``CMakeCache.txt``, ``CMakeFiles/``)."""
    cache = bdir / "CMakeCache.txt"
    try:
        text = cache.read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            home = line.split("=", 1)[-1].strip()
            try:
                same = Path(home).resolve() == source_dir().resolve()
            except OSError:
                same = False
            if not same:
                cache.unlink()
                shutil.rmtree(bdir / "CMakeFiles", ignore_errors=True)
            return


def repo_build_dir() -> Path | None:
    """``<repo>/build/plugins`` when this package runs from a source checkout, else None."""
    repo = source_dir().parent
    if (repo / "pyproject.toml").is_file() and (repo / "CMakeLists.txt").is_file():
        return repo / "build" / "plugins"
    return None


def search_dirs() -> list[Path]:
    """Folders :func:`find_library` searches, in order (see the module docstring)."""
    dirs: list[Path] = []
    env = os.environ.get("DVIS_TRT_PLUGIN_DIR", "")
    dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    dirs.append(source_dir())
    repo = repo_build_dir()
    if repo is not None:
        dirs.append(repo)
    dirs.append(cache_dir())
    return dirs


def find_library(kind: str) -> Path | None:
    """Path of the ``kind`` library ("cpu", "cuda" or "trt") in the first search folder that has it, else None.

    Raises ValueError for an unknown kind.
    """
    name = library_filename(kind)
    for d in search_dirs():
        p = d / name
        if p.is_file():
            return p
    return None


def require_library(kind: str) -> Path:
    """Like :func:`find_library` but raises :class:`DependencyError` (with what to do) when not found."""
    p = find_library(kind)
    if p is None:
        what = {"cpu": "", "cuda": " (needs nvcc)", "trt": " (needs nvcc and TensorRT headers)"}[kind]
        raise DependencyError(
            f"plugin library {library_filename(kind)} not found in {', '.join(str(d) for d in search_dirs())}; "
            f"build it with `dvis-trt build-plugins`{what} or point DVIS_TRT_PLUGIN_DIR at a folder holding it"
        )
    return p


@dataclasses.dataclass
class BuildResult:
    """Outcome of :func:`build`.

    build_dir: the CMake build folder; libraries: kind -> path for each library that was built;
    summary: CMake's "what was and wasn't built" lines; log: the full configure + build output.
    """

    build_dir: Path
    libraries: dict
    summary: str
    log: str


def _find_cxx() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # non-POSIX: no lock
            pass
        yield


def _first_error(output: str) -> str:
    """The first CMake / compiler error of a build log, as one line."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "CMake Error" in line or " error:" in line or line.startswith("error"):
            block = [line.strip()]
            for nxt in lines[i + 1:i + 8]:
                if not nxt.strip():
                    if len(block) > 1:
                        break
                    continue
                block.append(nxt.strip())
            return " ".join(block)
    tail = [ln.strip() for ln in lines if ln.strip()]
    return tail[-1] if tail else "no output"


def build(
    build_dir: str | os.PathLike | None = None,
    *,
    cuda: str = "auto",
    trt: str = "auto",
    cuda_archs: str | None = None,
    tensorrt_root: str | os.PathLike | None = None,
    tensorrt_include_dir: str | os.PathLike | None = None,
    jobs: int | None = None,
    targets: list | None = None,
    verbose: bool = False,
) -> BuildResult:
    """Configure and build the plugin libraries with CMake.

    build_dir: CMake build folder (default :func:`cache_dir`); cuda / trt: "auto", "on" or "off"
    (CMake options DVIS_BUILD_CUDA / DVIS_BUILD_TRT); cuda_archs: e.g. "90" or "80-real;90" (default: the
    CMake default, sm_80/86/87/89/90); tensorrt_root / tensorrt_include_dir: where NvInfer.h lives (default:
    the TENSORRT_ROOT / TensorRT_INCLUDE_DIR environment variables); jobs: parallel build jobs (default:
    CPU count); targets: CMake targets to build (default: all); verbose: stream the tool output.
    Returns a :class:`BuildResult`. Raises :class:`DependencyError` when cmake or a C++ compiler is missing or
    the build fails (with the tail of the log), :class:`InputError` for a bad option value.
    """
    opts = {}
    for name, val in (("cuda", cuda), ("trt", trt)):
        v = str(val).lower()
        if v not in ("auto", "on", "off"):
            raise InputError(f"--{name} must be auto, on or off, not {val!r}")
        opts[name] = v.upper()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise DependencyError("cmake not found on PATH: install it (e.g. `pip install cmake` or apt-get install cmake)")
    if _find_cxx() is None:
        raise DependencyError("no C++ compiler found (c++, g++ or clang++ on PATH, or set CXX)")
    bdir = Path(build_dir).expanduser() if build_dir is not None else cache_dir()
    bdir.mkdir(parents=True, exist_ok=True)
    args = [cmake, "-S", str(source_dir()), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
            f"-DDVIS_BUILD_CUDA={opts['cuda']}", f"-DDVIS_BUILD_TRT={opts['trt']}"]
    if cuda_archs:
        args.append(f"-DDVIS_CUDA_ARCHS={cuda_archs}")
    if tensorrt_root:
        args.append(f"-DTENSORRT_ROOT={Path(tensorrt_root).expanduser()}")
    if tensorrt_include_dir:
        args.append(f"-DTensorRT_INCLUDE_DIR={Path(tensorrt_include_dir).expanduser()}")
    build_args = [cmake, "--build", str(bdir), "--parallel", str(jobs or os.cpu_count() or 1)]
    for t in targets or []:
        build_args += ["--target", str(t)]
    log = []
    with _locked(bdir / ".dvis_build.lock"):
        _reset_foreign_cmake_cache(bdir)
        for cmd in (args, build_args):
            proc = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE,
                                  stderr=subprocess.STDOUT if not verbose else None, text=True)
            out = proc.stdout or ""
            log.append("$ " + " ".join(cmd) + "\n" + out)
            if proc.returncode != 0:
                log_file = bdir / "dvis_build.log"
                log_file.write_text("\n".join(log))
                raise DependencyError(
                    f"plugin build failed in {bdir}: {_first_error(out)} (full log: {log_file})"
                )
    summary_file = bdir / "dvis_msda_build.txt"
    summary = summary_file.read_text() if summary_file.is_file() else ""
    libs = {k: bdir / library_filename(k) for k in KINDS if (bdir / library_filename(k)).is_file()}
    return BuildResult(build_dir=bdir, libraries=libs, summary=summary, log="\n".join(log))


def ensure_library(kind: str = "cpu") -> Path:
    """Path of the ``kind`` library, building it into :func:`cache_dir` first when it is nowhere to be found.

    For "cpu" only the CPU twin is built (seconds). Raises :class:`DependencyError` when it cannot be found
    nor built (no cmake / compiler, or for "cuda"/"trt" no nvcc / TensorRT headers).
    """
    p = find_library(kind)
    if p is not None:
        return p
    if kind == "cpu":
        res = build(cuda="off", trt="off", targets=[KINDS["cpu"]])
    else:
        res = build()
    if kind in res.libraries:
        return res.libraries[kind]
    return require_library(kind)


