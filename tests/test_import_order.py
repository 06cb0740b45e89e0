"""Imports run one way between the project's folders (docs/architecture.md).

    dvis_trt (kernel)  <-  plugins  <-  runtime  <-  {engine, export}  <-  benchmarks

Every import statement of every module — top level or inside a function, absolute or relative —
is read from the source (AST, nothing is imported) and resolved to the folder it lands in.
The one sanctioned upward edge: the torch backend imports ``dvis_trt.export`` lazily (inside
functions), because the eager baseline *is* the exporter's model.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folder -> import package (pyproject's package-dir)
FOLDERS = {"dvis_trt": "dvis_trt", "plugins": "dvis_trt.plugins", "runtime": "dvis_trt.runtime",
           "engine": "dvis_trt.engine", "export": "dvis_trt.export",
           "benchmarks": "dvis_trt.benchmarks"}
LAYER = {"dvis_trt": "kernel", "dvis_trt.plugins": "plugins", "dvis_trt.runtime": "runtime",
         "dvis_trt.engine": "engine", "dvis_trt.export": "export",
         "dvis_trt.benchmarks": "benchmarks"}
#: layer -> the layers it may import (itself included)
ALLOWED = {
    "kernel": {"kernel"},
    "plugins": {"kernel", "plugins"},
    "runtime": {"kernel", "plugins", "runtime"},
    "engine": {"kernel", "plugins", "runtime", "engine"},
    "export": {"kernel", "plugins", "runtime", "export"},
    "benchmarks": {"kernel", "plugins", "runtime", "engine", "export", "benchmarks"},
}
#: (importing module, imported layer) allowed only inside functions
LAZY_EXCEPTIONS = {("dvis_trt.runtime.backends.torch_backend", "export")}


def _modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield path, ".".join([package, *parts]), path.name == "__init__.py"


def layer_of(module: str) -> str | None:
    """The layer of a dotted ``dvis_trt`` module name (None for third-party modules)."""
    if module != "dvis_trt" and not module.startswith("dvis_trt."):
        return None
    parts = module.split(".")
    if len(parts) >= 2 and ".".join(parts[:2]) in LAYER:
        return LAYER[".".join(parts[:2])]
    return "kernel"  # dvis_trt itself, dvis_trt.errors, dvis_trt.fileio, ...


def imports_of(source: str, module: str, is_package: bool):
    """(imported module, line, inside a function) for every import in ``source``."""
    tree = ast.parse(source)
    lazy_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    lazy_lines.add(inner.lineno)
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, node.lineno in lazy_lines
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from dvis_trt import plugins`` imports the plugins package
            names = [f"{target}.{a.name}" for a in node.names] if target == "dvis_trt" \
                else [target]
            for name in names:
                yield name, node.lineno, node.lineno in lazy_lines


def violations(root_files=None):
    """Lines ``module:line imports target (layer -> layer)`` that break the order."""
    out = []
    for path, module, is_package in (root_files or _modules()):
        src_layer = layer_of(module)
        for target, line, lazy in imports_of(path.read_text(encoding="utf-8"), module,
                                             is_package):
            dst_layer = layer_of(target)
            if dst_layer is None or dst_layer in ALLOWED[src_layer]:
                continue
            if lazy and (module, dst_layer) in LAZY_EXCEPTIONS:
                continue
            out.append(f"{path.relative_to(ROOT)}:{line} imports {target} "
                       f"({src_layer} -> {dst_layer})")
    return out


def test_imports_run_one_way():
    bad = violations()
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(bad)


def test_the_walk_sees_every_folder():
    seen = {layer_of(m) for _, m, _ in _modules()}
    assert seen == set(ALLOWED)
    # the sanctioned exception exists (else the rule is stale)
    torch_backend = ROOT / "runtime" / "backends" / "torch_backend.py"
    found = [(t, lazy) for t, _, lazy in imports_of(torch_backend.read_text(),
                                                     "dvis_trt.runtime.backends.torch_backend",
                                                     False) if layer_of(t) == "export"]
    assert found and all(lazy for _, lazy in found)


@pytest.mark.parametrize("source, module, expected", [
    ("from dvis_trt.engine.builder import machine_info\n", "dvis_trt.runtime.x", "engine"),
    ("from ..bundle import load_manifest\n", "dvis_trt.runtime.backends.x", None),
    ("def f():\n    from dvis_trt.export import stages\n", "dvis_trt.runtime.y", "export"),
    ("from dvis_trt import plugins\n", "dvis_trt.errors", "plugins"),
])
def test_a_wrong_edge_is_reported(tmp_path, source, module, expected):
    folder = tmp_path / "m.py"
    folder.write_text(source)
    layer = layer_of(module)
    got = [layer_of(t) for t, _, _ in imports_of(source, module, False)
           if layer_of(t) not in ALLOWED[layer]]
    assert got == ([expected] if expected else [])
