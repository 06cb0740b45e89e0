"""TensorRT optimization profiles per stage, derived from the bundle manifest and user limits.

No TensorRT here: profiles are plain data (min/opt/max per input shape) that the builder turns
into ``polygraphy.backend.trt.Profile`` objects and the engine manifest records.

Which shapes occur (DESIGN.md; official ``DVIS_DAQ_offline`` inference):

* ``segmenter`` ``images (T,3,Hp,Wp)``: ``T`` in ``[1, window]`` (the last window of a clip is
  short); ``Hp, Wp`` come from detectron2's ``ResizeShortestEdge`` (short side to
  ``min_size_test``, long side capped by ``max_size_test``, ``int(x + 0.5)``) and padding to
  ``size_divisibility``. The short side always becomes ``min_size_test``, so *every* 16:9
  video — 360p, 480p, 720p, 1080p alike — becomes 480x853 -> padded 480x864 (R50 OVIS config);
  only the aspect ratio and orientation matter. Portrait phone videos give 864x480.
* ``tracker_first`` / ``tracker_step`` / ``mask_head`` see ``mask_features`` at ``h = Hp/4``,
  ``w = Wp/4``; ``tracker_step`` has ``tQ`` live tracks in ``[1, max_tracks]`` (``slot_index``
  is ``tQ+S``).
* ``refiner``: ``L`` in ``[1, max_frames]`` (the clip), ``Qr`` = ``NUM_NEW_INS`` exactly: the
  official code takes the top ``min(OFFLINE_TOPK_NUM, #tracks)`` tracks and fills up to
  ``NUM_NEW_INS`` with frame-linked segmenter queries (``meta_architecture.py``,
  ``num_left = num_new_ins - ...``), so ``Qr = max(N, min(topk, #tracks))`` — ``N`` unless the
  config has ``OFFLINE_TOPK_NUM > NUM_NEW_INS``, in which case ``Qr`` ranges over ``[N, topk]``.
* ``mask_head``: ``t`` in ``[1, mask_window]`` (frame chunk of the final mask prediction),
  ``Qs`` in ``[1, max_num]`` (the distinct queries among the top ``MAX_NUM`` (query, class)
  pairs).

Profile layout (``mode="buckets"``, the default): for every stage whose inputs depend on the
image size, one profile per distinct padded size ``(Hp, Wp)`` with ``min = opt = max`` on the
spatial dims, plus — when there are several buckets — one *covering* profile spanning all of
them (``[min Hp, max Hp] x [min Wp, max Wp]``, opt at the first bucket). Why: convolution and
attention tactics are chosen per profile at its ``opt`` shape, so an exact profile per bucket
gets kernels tuned for the sizes that actually occur (the segmenter is >90% of the run time),
while the covering profile keeps any in-between aspect ratio (4:3, square) running instead of
failing. Build time grows with the number of profiles (3 for the default 16:9 both-orientation
set); ``mode="range"`` builds the single covering profile only (fastest build, one set of
kernels for all sizes). Profile ``i`` of every image-size stage is the same bucket, so the
runtime selects the same index everywhere. The refiner has a single profile.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from dvis_trt.errors import BundleError, InputError
from dvis_trt.runtime.bundle.manifest import BundleManifest
from dvis_trt.runtime.bundle.profiles import DimRange, Profile
from dvis_trt.runtime.bundle.shapes import eval_dim
from dvis_trt.runtime.bundle.stages import StageSpec

__all__ = ["RESOLUTION_PRESETS", "BuildLimits", "parse_resolution",
           "resized_padded_shape", "resolution_buckets", "derive_profiles", "stage_dim_ranges"]

#: Named resolutions (landscape width x height); both orientations are always added.
RESOLUTION_PRESETS: dict[str, tuple[int, int]] = {
    "240p": (426, 240), "360p": (640, 360), "480p": (854, 480), "540p": (960, 540),
    "720p": (1280, 720), "1080p": (1920, 1080), "1440p": (2560, 1440), "2160p": (3840, 2160),
    "4k": (3840, 2160), "vga": (640, 480),
}

IMAGE_SYMBOLS = frozenset({"Hp", "Wp", "h", "w"})


@dataclass(frozen=True)
class BuildLimits:
    """User-declared limits (``dvis-trt build`` flags). ``None`` = derive from the config.

    window: frames per segmenter call (``T`` max; official forward uses 5).
    max_frames: longest refiner clip ``L`` (the runtime's ``--clip-frames`` must not exceed it).
    resolutions: presets (``360p`` ...) or ``WxH``; both orientations are derived.
    max_tracks: most live tracks ``tQ`` in one tracker step (default ``2 * NUM_NEW_INS``).
    opt_tracks: ``tQ`` the tracker's kernels are tuned for (default ``min(32, max_tracks)``).
    max_num: most distinct queries ``Qs`` per mask-head call (default config ``max_num``).
    mask_window: most frames ``t`` per mask-head call (default ``max(window,
    refiner_window_size)``).
    mode: ``"buckets"`` (exact profile per size + a covering one) or ``"range"``.
    """

    window: int = 5
    max_frames: int = 100
    resolutions: tuple[str, ...] = ("360p", "480p", "720p")
    max_tracks: int | None = None
    opt_tracks: int | None = None
    max_num: int | None = None
    mask_window: int | None = None
    mode: str = "buckets"

    def to_dict(self) -> dict:
        return {"window": self.window, "max_frames": self.max_frames,
                "resolutions": list(self.resolutions), "max_tracks": self.max_tracks,
                "opt_tracks": self.opt_tracks, "max_num": self.max_num,
                "mask_window": self.mask_window, "mode": self.mode}


# ---------------------------------------------------------------------------------------------
def parse_resolution(text: str) -> tuple[int, int]:
    """``"720p"`` -> (1280, 720); ``"640x480"`` -> (640, 480). Returns (width, height).

    Raises :class:`InputError` for anything else.
    """
    t = text.strip().lower()
    if t in RESOLUTION_PRESETS:
        return RESOLUTION_PRESETS[t]
    m = re.fullmatch(r"(\d+)\s*[x×]\s*(\d+)", t)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return int(m.group(1)), int(m.group(2))
    raise InputError(f"--resolutions: {text!r} is neither a preset "
                     f"({', '.join(RESOLUTION_PRESETS)}) nor WIDTHxHEIGHT")


def resized_padded_shape(h: int, w: int, min_size: int, max_size: int,
                         size_divisibility: int) -> tuple[int, int]:
    """(Hp, Wp) the official preprocessing gives a (h, w) frame: detectron2
    ``ResizeShortestEdge.get_output_shape`` (short side -> ``min_size``, whole image scaled
    down if the long side exceeds ``max_size``, ``int(x + 0.5)`` per side), then padded up to a
    multiple of ``size_divisibility`` (``ImageList.from_tensors``). E.g. (360, 640, 480, 1333,
    32) -> (480, 864)."""
    scale = min_size / min(h, w)
    nh, nw = (min_size, scale * w) if h < w else (scale * h, min_size)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    rh, rw = int(nh + 0.5), int(nw + 0.5)
    d = size_divisibility if size_divisibility and size_divisibility > 1 else 1
    return -(-rh // d) * d, -(-rw // d) * d


def resolution_buckets(resolutions: Iterable[str], min_size: int, max_size: int,
                       size_divisibility: int) -> list[tuple[int, int]]:
    """Distinct padded (Hp, Wp) for the given resolutions in landscape *and* portrait, in
    first-seen order (landscape of the first resolution first)."""
    out: list[tuple[int, int]] = []
    res = list(resolutions)
    if not res:
        raise InputError("--resolutions is empty; give at least one (e.g. 480p)")
    for r in res:
        w, h = parse_resolution(r)
        for hh, ww in ((min(h, w), max(h, w)), (max(h, w), min(h, w))):
            b = resized_padded_shape(hh, ww, min_size, max_size, size_divisibility)
            if b not in out:
                out.append(b)
    return out


# ---------------------------------------------------------------------------------------------
def _check_limits(limits: BuildLimits) -> None:
    for name in ("window", "max_frames"):
        v = getattr(limits, name)
        if not isinstance(v, int) or v < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    for name in ("max_tracks", "opt_tracks", "max_num", "mask_window"):
        v = getattr(limits, name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if limits.mode not in ("buckets", "range"):
        raise InputError(f"profile mode {limits.mode!r} is not 'buckets' or 'range'")


def stage_dim_ranges(manifest: BundleManifest, limits: BuildLimits
                     ) -> dict[str, dict[str, DimRange]]:
    """Ranges of the non-image symbols per stage (the image symbols come from the buckets).

    Returns ``{stage: {symbol: DimRange}}`` for ``T`` (segmenter), ``tQ`` (tracker_step),
    ``L``, ``Qr`` (refiner), ``t``, ``Qs`` (mask_head). Raises :class:`InputError` for bad
    limits.
    """
    _check_limits(limits)
    cfg = manifest.config
    n = cfg.num_new_ins
    max_tracks = limits.max_tracks or 2 * n
    opt_tracks = min(limits.opt_tracks or 32, max_tracks)
    max_num = limits.max_num or cfg.max_num
    mask_window = limits.mask_window or max(limits.window, cfg.refiner_window_size)
    qr_max = max(n, cfg.offline_topk_num)
    return {
        "segmenter": {"T": DimRange(1, limits.window, limits.window)},
        "tracker_first": {},
        "tracker_step": {"tQ": DimRange(1, opt_tracks, max_tracks)},
        "refiner": {"L": DimRange(1, limits.max_frames, limits.max_frames),
                    "Qr": DimRange(n, n, qr_max)},
        "mask_head": {"t": DimRange(1, mask_window, mask_window),
                      "Qs": DimRange(1, max_num, max_num)},
        # online mode: the tracks stored at a frame (live tracks + this frame's births)
        "tracker_masks": {"tM": DimRange(1, opt_tracks, max(max_tracks + n, cfg.num_queries))},
    }


def _image_ranges(buckets: Sequence[tuple[int, int]], mode: str
                  ) -> list[tuple[str, dict[str, DimRange]]]:
    def rng(hp_lo, hp_opt, hp_hi, wp_lo, wp_opt, wp_hi):
        return {"Hp": DimRange(hp_lo, hp_opt, hp_hi), "Wp": DimRange(wp_lo, wp_opt, wp_hi),
                "h": DimRange(hp_lo // 4, hp_opt // 4, hp_hi // 4),
                "w": DimRange(wp_lo // 4, wp_opt // 4, wp_hi // 4)}

    hs = [b[0] for b in buckets]
    ws = [b[1] for b in buckets]
    covering = ("range", rng(min(hs), buckets[0][0], max(hs), min(ws), buckets[0][1], max(ws)))
    if mode == "range":
        return [covering]
    out = [(f"{hp}x{wp}", rng(hp, hp, hp, wp, wp, wp)) for hp, wp in buckets]
    if len(buckets) > 1:
        out.append(covering)
    return out


def _shape_range(spec_shape, dims: Mapping[str, DimRange], where: str):
    result = []
    for which in ("min", "opt", "max"):
        values = {k: getattr(r, which) for k, r in dims.items()}
        try:
            result.append(tuple(eval_dim(d, values) for d in spec_shape))
        except KeyError as exc:
            raise BundleError(f"{where}: no profile range for symbol {exc.args[0]!r} in shape "
                              f"{list(spec_shape)}; the bundle has a dynamic dim this dvis-trt "
                              "does not know — re-export it") from None
    return tuple(result)


def _stage_profiles(stage: StageSpec, fixed: Mapping[str, DimRange],
                    image: list[tuple[str, dict[str, DimRange]]]) -> list[Profile]:
    symbols = stage.symbols
    uses_image = bool(symbols & IMAGE_SYMBOLS)
    variants = image if uses_image else [("all", {})]
    profiles = []
    for name, img in variants:
        dims = {**fixed, **img}
        dims = {k: v for k, v in dims.items() if k in symbols}
        shapes = {t.name: _shape_range(t.shape, dims, f"stage '{stage.name}' input '{t.name}'")
                  for t in stage.inputs}
        profiles.append(Profile(name, dims, shapes))
    return profiles


def derive_profiles(manifest: BundleManifest, limits: BuildLimits,
                    stages: Iterable[str] | None = None) -> dict[str, list[Profile]]:
    """Optimization profiles for each stage (see the module docstring for the layout).

    Every input of every stage gets a (min, opt, max) shape; opt lies inside [min, max].
    Raises :class:`InputError` for bad limits, :class:`BundleError` when a stage has a dynamic
    dim no limit covers, or when the config's ``size_divisibility`` is not a multiple of 4
    (mask features are at stride 4).
    """
    cfg = manifest.config
    if cfg.size_divisibility % 4:
        raise BundleError(f"config size_divisibility = {cfg.size_divisibility} is not a multiple "
                          "of 4; mask features (stride 4) need Hp, Wp divisible by 4")
    fixed = stage_dim_ranges(manifest, limits)
    buckets = resolution_buckets(limits.resolutions, cfg.min_size_test, cfg.max_size_test,
                                 cfg.size_divisibility)
    image = _image_ranges(buckets, limits.mode)
    out: dict[str, list[Profile]] = {}
    for name in (manifest.stages if stages is None else stages):
        stage = manifest.stage(name)
        unknown = stage.symbols - set(fixed.get(name, {})) - IMAGE_SYMBOLS
        if unknown:
            raise BundleError(f"stage '{name}' has dynamic dims {sorted(unknown)} that no build "
                              "limit covers; re-export the bundle with this dvis-trt")
        out[name] = _stage_profiles(stage, fixed.get(name, {}), image)
    return out


__all__ += ["IMAGE_SYMBOLS"]
