"""The bundle contract: what a bundle folder holds and how the runtime reads it.

- :mod:`.shapes`   the shape language (symbolic dims and their arithmetic)
- :mod:`.stages`   stage names, MSDA modes, precisions and each stage's tensor contract
- :mod:`.config`   :class:`InferenceConfig`, the one inference config type
- :mod:`.manifest` ``manifest.json``: :class:`BundleManifest`, load / write, constants
- :mod:`.engines`  an engine folder's ``engines.json`` and its staleness rules
- :mod:`.profiles` TensorRT optimization profiles as data; choosing one at run time

The names below are re-exported for convenience; each is defined once, in its submodule.
"""
from .config import InferenceConfig
from .manifest import (FORMAT_VERSION, MANIFEST_NAME, BundleManifest, ConstantsSpec,
                       load_constants, load_manifest, manifest_from_dict, write_manifest)
from .shapes import (DERIVED_DIMS, Dim, eval_dim, infer_dims, num_elements, resolve_shape,
                     shape_symbols, simplify_dim, with_derived_dims)
from .stages import (DTYPES, EXPORT_STAGE_NAMES, FIXED_SYMBOLS, MSDA_MODES, ONLINE_STAGE_NAMES,
                     PRECISIONS, STAGE_NAMES, STAGE_SPECS,
                     StageSpec, TensorSpec, stage_specs)

__all__ = [
    "InferenceConfig", "FORMAT_VERSION", "MANIFEST_NAME", "BundleManifest", "ConstantsSpec",
    "load_constants", "load_manifest", "manifest_from_dict", "write_manifest", "DERIVED_DIMS", "Dim", "eval_dim",
    "infer_dims", "num_elements", "resolve_shape", "shape_symbols", "simplify_dim",
    "with_derived_dims", "DTYPES", "EXPORT_STAGE_NAMES", "ONLINE_STAGE_NAMES", "FIXED_SYMBOLS", "MSDA_MODES", "PRECISIONS", "STAGE_NAMES",
    "STAGE_SPECS", "StageSpec", "TensorSpec", "stage_specs",
]
