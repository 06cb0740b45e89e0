"""Writing an exported bundle: stage graphs with ONNX external data, the atomic folder swap.

A graph larger than :data:`EXTERNAL_DATA_THRESHOLD` is saved with its initializers in one
``<stage>.onnx.data`` file next to it (:func:`save_graph`, :func:`external_data_file`); the
finished bundle folder replaces the old one in one step (:func:`replace_dir`,
:mod:`dvis_trt.outputs`). Used by :mod:`dvis_trt.export.onnx_export`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import onnx



from .onnx_checks import ExportError

__all__ = ["EXTERNAL_DATA_THRESHOLD", "external_data_file", "save_graph", "replace_dir"]


#: A stage graph whose serialised size exceeds this is saved with ONNX external data: the graph
#: in ``<stage>.onnx`` (a few MB), every initializer over 1 KiB in one file ``<stage>.onnx.data``
#: next to it (recorded in the manifest with its own sha256). Protobuf cannot serialise a
#: message over 2 GiB; the margin is for the tools that re-serialise a graph with more in it
#: (precision conversion keeps fp32 copies of kept-fp32 constants, Q/DQ export adds scales,
#: ``onnx.checker`` / shape inference serialise in memory). ViT-L's fp32 segmenter (~1.3 GB)
#: goes external; the R50 stages (<= 0.2 GB) stay single files.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def external_data_file(path: Union[str, os.PathLike]) -> Optional[str]:
    """The one external-data file a saved graph references (relative name), or None.

    Raises ExportError when the graph references several files or one outside its folder.
    """
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in init.external_data if e.key == "location")
    if not names:
        return None
    if len(names) > 1 or any(Path(n).name != n for n in names):
        raise ExportError(f"{path}: external data in {sorted(names)}; expected one file next to "
                          "the graph")
    return names.pop()


def save_graph(model: onnx.ModelProto, path: Union[str, os.PathLike],
               threshold: Optional[int] = None) -> Optional[str]:
    """Save ``model`` to ``path``, with external data ``<name>.data`` when it is larger than
    ``threshold`` bytes (see :data:`EXTERNAL_DATA_THRESHOLD`); returns the data file's name or
    None. ``model``'s initializers are turned into external references when saved that way.
    A stale data file of the same name is removed first (it would be appended to)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if model.ByteSize() > (EXTERNAL_DATA_THRESHOLD if threshold is None else threshold):
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(data, 0o666 & ~umask)  # onnx creates it 0600; same mode as the graph beside it
        return data.name
    onnx.save_model(model, str(path))
    return None


# ---------------------------------------------------------------------------------------------
# atomic folder replace
# ---------------------------------------------------------------------------------------------
def replace_dir(new: Path, dest: Path) -> None:
    """Put the finished bundle folder ``new`` at ``dest`` (see
    :func:`dvis_trt.outputs.commit_folder`): a folder of ours is replaced (only the entries
    its marker lists, plus ``engines/``, are deleted; a user's files beside them stay), a
    missing or empty one is created.

    Raises:
        InputError: ``dest`` is a file, or a non-empty folder that is not a dvis-trt bundle
            (no marker): we never delete what we did not write.
    """
    from dvis_trt.outputs import commit_folder, owned_entries

    owned = owned_entries(dest, extra_owned=("engines",))
    commit_folder(Path(new), Path(dest), owned)
