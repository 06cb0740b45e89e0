"""The one inference config type: :class:`InferenceConfig`.

Built by ``dvis_trt.export.config.inference_config`` from the official (detectron2-style)
config, written to and read from the ``config`` block of ``manifest.json``, and consumed by
the runtime pipeline and the eager PyTorch model alike. Frozen: derive a variant with
``dataclasses.replace(cfg, min_size_test=360)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from dvis_trt.errors import BundleError

__all__ = ["InferenceConfig"]


# config fields: name -> (types accepted, required)
_CONFIG_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "source": ((str, type(None)), False),
    "num_classes": ((int,), True),
    "num_queries": ((int,), True),
    "hidden_dim": ((int,), True),
    "mask_dim": ((int,), True),
    "num_new_ins": ((int,), True),
    "num_slots": ((int,), True),
    "pixel_mean": ((list,), True),
    "pixel_std": ((list,), True),
    "min_size_test": ((int,), True),
    "max_size_test": ((int,), True),
    "size_divisibility": ((int,), True),
    "inference_select_threshold": ((float, int), True),
    "aux_inference_select_threshold": ((float, int), True),
    "dis_fg_threshold": ((float, int), True),
    "ovis_infer": ((bool,), True),
    "noise_frame_num": ((int,), True),
    "offline_topk_num": ((int,), True),
    "max_num": ((int,), True),
    "refiner_window_size": ((int,), True),
    "input_format": ((str,), False),
    "class_names": ((list, type(None)), False),
}


@dataclass(frozen=True)
class InferenceConfig:
    """The model/inference values that inference needs (official config values).

    Fields (official config key in brackets): ``num_classes`` K [MODEL.SEM_SEG_HEAD.NUM_CLASSES],
    ``num_queries`` Q [MASK_FORMER.NUM_OBJECT_QUERIES], ``hidden_dim`` C, ``mask_dim`` D
    [SEM_SEG_HEAD.MASK_DIM], ``num_new_ins`` N and ``num_slots`` S [VIDEO_HEAD],
    ``pixel_mean``/``pixel_std`` (3 floats, 0..255 units, in ``input_format`` channel order),
    ``min_size_test``/``max_size_test`` (pixels) [INPUT], ``size_divisibility`` (pad H, W to a
    multiple; 1 = none), the thresholds ``inference_select_threshold``,
    ``aux_inference_select_threshold``, ``dis_fg_threshold``, ``ovis_infer``,
    ``noise_frame_num``, ``offline_topk_num`` [VIDEO_HEAD], ``max_num`` [MASK_FORMER.TEST.MAX_NUM],
    ``refiner_window_size`` [MASK_FORMER.TEST.WINDOW_SIZE], ``input_format`` "RGB"/"BGR"
    [INPUT.FORMAT], ``source`` (the config file), ``class_names`` (K names or ``None``).
    Unknown manifest keys are kept in ``extra`` and written back unchanged.
    :meth:`from_dict` raises :class:`BundleError` for a missing, mistyped or non-positive value.
    """

    num_classes: int
    num_queries: int
    hidden_dim: int
    mask_dim: int
    num_new_ins: int
    num_slots: int
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    min_size_test: int
    max_size_test: int
    size_divisibility: int
    inference_select_threshold: float
    aux_inference_select_threshold: float
    dis_fg_threshold: float
    ovis_infer: bool
    noise_frame_num: int
    offline_topk_num: int
    max_num: int
    refiner_window_size: int
    source: str | None = None
    class_names: tuple[str, ...] | None = None
    input_format: str = "RGB"
    extra: dict = field(default_factory=dict)

    @property
    def dims(self) -> dict[str, int]:
        """The fixed stage dims: ``Q, C, D, K, N, S`` (see :func:`stage_specs`)."""
        return {"Q": self.num_queries, "C": self.hidden_dim, "D": self.mask_dim,
                "K": self.num_classes, "N": self.num_new_ins, "S": self.num_slots}

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _CONFIG_FIELDS}
        d["pixel_mean"] = list(self.pixel_mean)
        d["pixel_std"] = list(self.pixel_std)
        d["class_names"] = None if self.class_names is None else list(self.class_names)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "InferenceConfig":
        if not isinstance(d, Mapping):
            raise BundleError("manifest 'config' is not an object; re-export the bundle")
        kw: dict[str, Any] = {}
        for name, (types, required) in _CONFIG_FIELDS.items():
            if name not in d:
                if required:
                    raise BundleError(f"manifest config lacks '{name}'; re-export the bundle "
                                      "with this dvis-trt version")
                kw[name] = None
                continue
            value = d[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise BundleError(f"manifest config '{name}' = {value!r} has the wrong type "
                                  f"(expected {'/'.join(t.__name__ for t in types)})")
            kw[name] = value
        for name in ("num_classes", "num_queries", "hidden_dim", "mask_dim", "num_new_ins",
                     "num_slots", "min_size_test", "max_size_test", "max_num",
                     "refiner_window_size", "offline_topk_num"):
            if kw[name] <= 0:
                raise BundleError(f"manifest config '{name}' = {kw[name]} must be positive")
        for name in ("pixel_mean", "pixel_std"):
            if len(kw[name]) != 3:
                raise BundleError(f"manifest config '{name}' needs 3 values (RGB), "
                                  f"got {kw[name]!r}")
            kw[name] = tuple(float(x) for x in kw[name])
        for name in ("inference_select_threshold", "aux_inference_select_threshold",
                     "dis_fg_threshold"):
            kw[name] = float(kw[name])
        if kw["input_format"] is None:
            kw["input_format"] = "RGB"
        from ..validate import check_config_values  # finite, in range, consistent
        check_config_values(kw)
        if kw["class_names"] is not None:
            if len(kw["class_names"]) != kw["num_classes"]:
                raise BundleError(f"manifest config has {len(kw['class_names'])} class_names "
                                  f"but num_classes = {kw['num_classes']}")
            kw["class_names"] = tuple(str(x) for x in kw["class_names"])
        extra = {k: v for k, v in d.items() if k not in _CONFIG_FIELDS}
        return cls(**kw, extra=extra)
