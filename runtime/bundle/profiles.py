"""TensorRT optimization profiles as plain data, and choosing one at run time.

:class:`Profile` (min/opt/max per input shape of one stage) is written by the engine builder
(``dvis_trt.engine.profiles.derive_profiles``) into the engine manifest and read back by the
TensorRT backend, which picks the profile for each call with :func:`select_profile`.
No TensorRT here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["DimRange", "Profile", "select_profile", "describe_limits"]


@dataclass(frozen=True)
class DimRange:
    """min <= opt <= max of one symbol."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"bad dim range min={self.min} opt={self.opt} max={self.max}")

    def contains(self, v: int) -> bool:
        return self.min <= v <= self.max


@dataclass(frozen=True)
class Profile:
    """One optimization profile of one stage.

    name: bucket key (``"480x864"``, ``"range"``, ``"all"``); dims: symbol -> range;
    shapes: input name -> (min_shape, opt_shape, max_shape) (concrete tuples).
    """

    name: str
    dims: dict[str, DimRange]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = \
        field(default_factory=dict)

    def contains(self, input_shapes: Mapping[str, Sequence[int]]) -> bool:
        """True when every given input shape lies inside [min, max] on every axis."""
        for name, shape in input_shapes.items():
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
                return False
        return True

    def to_dict(self) -> dict:
        return {"name": self.name,
                "dims": {k: [r.min, r.opt, r.max] for k, r in self.dims.items()},
                "shapes": {k: [list(a), list(b), list(c)] for k, (a, b, c) in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Profile":
        return cls(name=str(d["name"]),
                   dims={k: DimRange(*map(int, v)) for k, v in d["dims"].items()},
                   shapes={k: tuple(tuple(int(x) for x in s) for s in v)  # type: ignore[misc]
                           for k, v in d["shapes"].items()})


def select_profile(profiles: Sequence[Profile], input_shapes: Mapping[str, Sequence[int]]
                   ) -> int:
    """Index of the profile to run ``input_shapes`` with: the first profile that contains them
    (exact buckets come before the covering profile, so an exact match wins). Returns -1 when
    none does."""
    for i, p in enumerate(profiles):
        if p.contains(input_shapes):
            return i
    return -1


def describe_limits(profiles: Sequence[Profile]) -> str:
    """Human summary of what a stage's profiles accept, for error messages."""
    parts = []
    for p in profiles:
        parts.append(p.name + ": " + ", ".join(f"{k} in [{r.min}, {r.max}]"
                                               for k, r in sorted(p.dims.items())))
    return "; ".join(parts)
