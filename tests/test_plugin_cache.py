"""The plugin build cache is safe to share: build folders are keyed by the sources' content and
location, and a CMake cache configured from another (moved, deleted) source folder is reset."""
from __future__ import annotations

import shutil

import pytest

from dvis_trt import plugins


_REAL_SOURCES = plugins.source_dir()


def _copy_sources(dst):
    src = _REAL_SOURCES
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    return dst


def test_cache_dir_keyed_by_content_and_location(tmp_path, monkeypatch):
    monkeypatch.setenv("DVIS_TRT_CACHE_DIR", str(tmp_path / "cache"))
    a, b = _copy_sources(tmp_path / "a"), _copy_sources(tmp_path / "b")
    monkeypatch.setattr(plugins.library, "source_dir", lambda: a)
    da = plugins.cache_dir()
    monkeypatch.setattr(plugins.library, "source_dir", lambda: b)
    db = plugins.cache_dir()
    assert da != db and da.parent == db.parent == tmp_path / "cache" / "plugins"
    assert da.name.split("-")[0] == db.name.split("-")[0]      # same content hash
    (b / "src" / "msda_cpu.cpp").write_text("// changed\n")
    assert plugins.cache_dir().name.split("-")[0] != db.name.split("-")[0]


def test_foreign_cmake_cache_is_reset(tmp_path, monkeypatch):
    a = _copy_sources(tmp_path / "a")
    monkeypatch.setattr(plugins.library, "source_dir", lambda: a)
    bdir = tmp_path / "build"
    (bdir / "CMakeFiles").mkdir(parents=True)
    (bdir / "libdvis_msda_cpu.so").write_bytes(b"x")
    (bdir / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={a}\n")
    plugins.library._reset_foreign_cmake_cache(bdir)                  # ours: kept
    assert (bdir / "CMakeCache.txt").exists()
    (bdir / "CMakeCache.txt").write_text("CMAKE_HOME_DIRECTORY:INTERNAL=/gone/checkout/plugins\n")
    plugins.library._reset_foreign_cmake_cache(bdir)                  # a moved/deleted checkout's
    assert not (bdir / "CMakeCache.txt").exists() and not (bdir / "CMakeFiles").exists()
    assert (bdir / "libdvis_msda_cpu.so").exists()            # only CMake's own files go


def test_two_checkouts_build_into_one_shared_folder(tmp_path, monkeypatch):
    """Real CMake builds of the CPU twin from two source folders into one build folder (the
    second checkout replaces the first, which is then deleted)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    shared = tmp_path / "shared_build"
    for name in ("a", "b"):
        src = _copy_sources(tmp_path / name)
        monkeypatch.setattr(plugins.library, "source_dir", lambda src=src: src)
        res = plugins.build(shared, cuda="off", trt="off", targets=["dvis_msda_cpu"])
        assert "cpu" in res.libraries
        shutil.rmtree(src)
