"""Which ``pip install 'dvis-trt[EXTRA]'`` provides a missing optional package, in one line.

The edge install (``pip install dvis-trt``) runs bundles with ONNX Runtime and nothing else;
the extras of ``pyproject.toml`` add the rest. Code that needs an optional package either calls
:func:`require` before using it, or simply imports it: the CLI turns any
``ModuleNotFoundError`` for a package listed in :data:`EXTRA_OF` into :func:`missing_message`
(one line, exit 3) instead of a traceback.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

from dvis_trt.errors import DependencyError

__all__ = ["EXTRA_OF", "extra_for", "missing_message", "require", "have"]

#: top-level import name -> (extra that installs it, what the package is)
EXTRA_OF = {
    "torch": ("export", "PyTorch"),
    "onnx": ("export", "onnx"),
    "onnxscript": ("export", "onnxscript"),
    "onnx_graphsurgeon": ("export", "onnx-graphsurgeon"),
    "yaml": ("export", "PyYAML"),  # the config reader is export's: the edge install has none
    "polygraphy": ("engine", "Polygraphy"),
    "tensorrt": ("engine", "TensorRT"),
    "cuda": ("engine", "cuda-python"),
    "onnxruntime_extensions": ("plugin", "onnxruntime-extensions"),
    "matplotlib": ("bench", "matplotlib"),
    "psutil": ("bench", "psutil"),
    "ray": ("ray", "Ray"),
    "pytest": ("test", "pytest"),
}


def extra_for(module: str) -> Optional[str]:
    """The extra providing top-level module ``module`` (``"torch.nn"`` -> ``"export"``), or None."""
    entry = EXTRA_OF.get(str(module).split(".")[0])
    return entry[0] if entry else None


def missing_message(module: str, command: Optional[str] = None, why: str = "") -> str:
    """``'dvis-trt export' needs PyTorch (not installed): pip install 'dvis-trt[export]'``."""
    top = str(module).split(".")[0]
    extra, label = EXTRA_OF.get(top, ("all", top))
    who = f"'dvis-trt {command}'" if command else "this"
    hint = ""
    if top == "tensorrt":
        hint = " (or TensorRT from NVIDIA / JetPack; GPU only, see docs/deploy_gpu.md)"
    elif top == "torch":
        hint = " (on a GPU machine install your CUDA build of torch first)"
    return (f"{who} needs {label}{why}, which is not installed: "
            f"pip install 'dvis-trt[{extra}]'{hint}")


def have(module: str) -> bool:
    """True when ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, command: Optional[str] = None, why: str = ""):
    """Import and return ``module``; raise :class:`DependencyError` naming the extra if absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        raise DependencyError(missing_message(missing, command, why), exit_code=3) from None
