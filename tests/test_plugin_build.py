"""Building the MSDeformAttn plugin libraries: CMake configuration and summary, the CUDA kernel library (compiled
with nvcc, no GPU needed; its error paths are checked on a machine without one), the TensorRT plugin (opt-in:
compile and host-side checks when TensorRT headers are given), and the Python finder / builder / CLI.

The build is cached in build/plugins (same configuration as tests/test_plugin_cpu.py, so nothing recompiles
between the two files or between runs). CUDA is compiled for one architecture (DVIS_TEST_CUDA_ARCHS, default
90); the slow test compiles every default architecture. The TensorRT checks run when TensorRT_INCLUDE_DIR or
TENSORRT_ROOT points at TensorRT headers (e.g. TensorRT_INCLUDE_DIR=/path/to/TensorRT/include); TensorRT's
libraries are never needed: the plugin links none of them.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import dvis_trt.plugins as plugins
from dvis_trt.plugins import build, find_library, library_filename
from dvis_trt.errors import DependencyError, InputError

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / "build" / "plugins"
CUDA_ARCHS = os.environ.get("DVIS_TEST_CUDA_ARCHS", "90")
HAVE_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX"))


def _trt_include() -> Path | None:
    for var, sub in (("TensorRT_INCLUDE_DIR", ""), ("TENSORRT_ROOT", "include")):
        v = os.environ.get(var)
        if v and (Path(v) / sub / "NvInferRuntime.h").is_file():
            return Path(v) / sub
    return None


@pytest.fixture(scope="module")
def built():
    t0 = time.monotonic()
    res = build(BUILD_DIR, cuda_archs=CUDA_ARCHS)
    res.seconds = time.monotonic() - t0
    return res


def test_cmake_builds_cpu_twin_and_reports_what_was_built(built):
    assert (built.build_dir / library_filename("cpu")).is_file()
    assert "cpu" in built.libraries
    lines = built.summary
    assert "cpu twin:        ON" in lines
    assert ("cuda kernel:     ON" in lines) == HAVE_NVCC, lines
    assert "tensorrt plugin:" in lines
    # ON only with nvcc and headers (found now or cached from an earlier configure of this folder)
    assert ("tensorrt plugin: ON" in lines) == ("trt" in built.libraries)
    if not HAVE_NVCC:
        assert "tensorrt plugin: OFF (needs the CUDA kernel" in lines


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found")
def test_cuda_kernel_library_builds_and_fails_cleanly_without_gpu(built):
    path = built.build_dir / library_filename("cuda")
    assert path.is_file() and built.libraries.get("cuda") == path
    assert f"archs {CUDA_ARCHS.replace(';', ',')}" in built.summary
    lib = ctypes.CDLL(str(path))  # the CUDA runtime is linked statically: loads without a driver
    assert lib.dvis_msda_cuda_abi_version() == plugins.ABI_VERSION
    vw = lib.dvis_msda_cuda_vector_width
    vw.restype = ctypes.c_int32
    vw.argtypes = [ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    # 16-byte loads when D and alignment allow (fp32: 4, fp16/bf16: 8), else 2, else 1.
    assert vw(0, 32, 256, 512) == 4 and vw(1, 32, 256, 512) == 8 and vw(2, 64, 256, 512) == 8
    assert vw(1, 12, 256, 512) == 2 and vw(0, 5, 256, 512) == 1 and vw(0, 32, 260, 512) == 1
    fwd = lib.dvis_msda_cuda_forward
    fwd.restype = ctypes.c_int32
    fwd.argtypes = [ctypes.c_int32, ctypes.c_int32] + [ctypes.c_void_p] * 3 + [ctypes.c_int32] \
        + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 7 + [ctypes.c_void_p]
    lib.dvis_msda_cuda_last_error.restype = ctypes.c_char_p
    p = 4096  # never dereferenced on the host
    dims = (1, 10, 2, 32, 1, 10, 4)
    assert fwd(0, 0, p, p, p, 1, p, p, p, 0, *dims[1:], None) == 0  # empty batch: nothing to launch
    assert fwd(0, 0, p, p, p, 1, p, p, p, -1, *dims[1:], None) == -1  # DVIS_MSDA_ERR_ARGUMENT
    assert fwd(0, 2, p, p, p, 1, p, p, p, *dims, None) == -3  # bf16 locations with fp32 value: ERR_DTYPE
    rc = fwd(0, 0, p, p, p, 1, p, p, p, *dims, None)
    if rc == -4:  # no GPU here: the launch error comes back as a status, not a crash
        assert b"kernel launch failed" in lib.dvis_msda_cuda_last_error()


def test_trt_plugin_compiles_against_headers_and_passes_host_checks():
    inc = _trt_include()
    if inc is None:
        pytest.skip("set TensorRT_INCLUDE_DIR (or TENSORRT_ROOT) to TensorRT headers to compile the plugin")
    if not HAVE_NVCC:
        pytest.skip("nvcc not found (the plugin embeds the CUDA kernel)")
    res = build(BUILD_DIR, cuda_archs=CUDA_ARCHS, trt="on", tensorrt_include_dir=inc)
    lib = res.build_dir / library_filename("trt")
    assert lib.is_file() and "tensorrt plugin: ON" in res.summary, res.summary
    # No TensorRT library is a dependency: the plugin is handed everything through loadLibrary's entry points.
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
        assert "nvinfer" not in needed, needed
    harness = res.build_dir / "trt_plugin_harness"
    proc = subprocess.run([str(harness), str(lib)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: 0 failure(s)" in proc.stdout
    plib = ctypes.CDLL(str(lib))
    plib.dvis_msda_trt_plugin_info.restype = ctypes.c_char_p
    assert plib.dvis_msda_trt_plugin_info().decode().startswith("DvisMSDeformAttn 1")
    # DVIS_TRT_PLUGIN_AUTOREGISTER=1 without libnvinfer in the process: one error line, no crash.
    env = dict(os.environ, DVIS_TRT_PLUGIN_AUTOREGISTER="1")
    code = f"import ctypes; ctypes.CDLL({str(lib)!r}); print('loaded')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "loaded" in proc.stdout and "could not be registered" in proc.stderr


def test_register_trt_plugin_uses_load_library_once(built, monkeypatch, tmp_path):
    """register_trt_plugin() against a stand-in tensorrt module (the real one needs a GPU machine)."""
    lib = built.build_dir / library_filename("trt")
    if not lib.is_file():
        pytest.skip("TensorRT plugin not built (set TensorRT_INCLUDE_DIR)")
    calls = []

    class Registry:
        def get_creator(self, name, version, ns=""):
            calls.append(("get_creator", name, version, ns))
            return None

        def load_library(self, path):
            calls.append(("load_library", path))
            return object()

    reg = Registry()
    fake = types.ModuleType("tensorrt")
    fake.get_plugin_registry = lambda: reg
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(plugins.trt_register, "_trt_handles", {})
    assert plugins.register_trt_plugin(lib) == lib.resolve()
    assert plugins.register_trt_plugin(lib) == lib.resolve()  # second call: nothing more
    assert calls == [("get_creator", "DvisMSDeformAttn", "1", ""), ("load_library", str(lib.resolve()))]
    with pytest.raises(DependencyError, match="does not exist"):
        plugins.register_trt_plugin(tmp_path / "missing.so")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found")
def test_cuda_kernel_compiles_for_all_default_archs():
    """sm_80, sm_86, sm_87 (Orin), sm_89, sm_90 (+PTX): the CMake default (a separate build folder)."""
    res = build(REPO / "build" / "plugins-allarch", trt="off", targets=["dvis_msda_cuda"])
    assert "cuda" in res.libraries
    assert "archs 80-real,86-real,87-real,89-real,90" in res.summary


# ---------------------------------------------------------------------------------------------------------------
# Python side: finder, builder, CLI
# ---------------------------------------------------------------------------------------------------------------
def test_find_library_search_order(built, tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        find_library("gpu")
    monkeypatch.delenv("DVIS_TRT_PLUGIN_DIR", raising=False)
    assert find_library("cpu") is not None
    # DVIS_TRT_PLUGIN_DIR comes first, and may list several folders.
    d1, d2 = tmp_path / "a", tmp_path / "b"
    d1.mkdir()
    d2.mkdir()
    (d2 / library_filename("cpu")).write_bytes(b"")
    monkeypatch.setenv("DVIS_TRT_PLUGIN_DIR", os.pathsep.join([str(d1), str(d2)]))
    assert find_library("cpu") == d2 / library_filename("cpu")
    assert plugins.search_dirs()[:2] == [d1, d2]
    # Not found anywhere: None, and require_library says what to do.
    monkeypatch.setattr(plugins.library, "search_dirs", lambda: [d1])
    assert find_library("trt") is None
    with pytest.raises(DependencyError, match="build-plugins"):
        plugins.require_library("trt")


def test_ensure_library_builds_cpu_twin_into_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DVIS_TRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DVIS_TRT_PLUGIN_DIR", raising=False)
    monkeypatch.setattr(plugins.library, "repo_build_dir", lambda: None)  # as in an installed package
    assert find_library("cpu") is None
    path = plugins.ensure_library("cpu")
    assert path.parent == plugins.cache_dir() and path.is_file()
    assert plugins.cache_dir().parent == tmp_path / "cache" / "plugins"
    assert find_library("cpu") == path
    lib = ctypes.CDLL(str(path))
    assert lib.dvis_msda_cpu_abi_version() == plugins.ABI_VERSION


def test_source_hash_tracks_sources():
    h = plugins.source_hash()
    assert len(h) == 16 and h == plugins.source_hash()
    for rel in ("CMakeLists.txt", "include/dvis_msda/msda_math.h", "src/msda_cpu.cpp", "src/msda_cuda.cu",
                "src/msda_trt_plugin.cpp"):
        assert (plugins.source_dir() / rel).is_file(), rel


def test_build_reports_missing_tools_and_bad_options(monkeypatch, tmp_path):
    with pytest.raises(InputError, match="--cuda"):
        build(tmp_path, cuda="maybe")
    real_which = shutil.which
    monkeypatch.setattr(plugins.library.shutil, "which", lambda n, *a, **k: None if n == "cmake" else real_which(n))
    with pytest.raises(DependencyError, match="cmake"):
        build(tmp_path)


def test_cli_list_and_parser(built, capsys, monkeypatch):
    from dvis_trt.plugins import cli

    monkeypatch.delenv("DVIS_TRT_PLUGIN_DIR", raising=False)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--list"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "search folders" in out and str(BUILD_DIR / library_filename("cpu")) in out
    args = parser.parse_args(["--cuda", "off", "--trt", "off", "--build-dir", str(BUILD_DIR / "x"), "-j", "2"])
    assert (args.cuda, args.trt, args.jobs) == ("off", "off", 2)
