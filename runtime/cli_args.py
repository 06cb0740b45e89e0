"""The one command-line convention of every ``dvis-trt`` verb (read this before adding options).

1. **The main object is positional** (trtexec / Polygraphy / Ultralytics habit)::

       dvis-trt export CHECKPOINT --config r50-ovis -o bundle/
       dvis-trt build  BUNDLE [options]          dvis-trt check BUNDLE [options]
       dvis-trt run    BUNDLE INPUT... [options]  dvis-trt bench BUNDLE... VIDEO [options]

   Declare it with :func:`add_main_argument`; it adds the positional *and* the older flag
   (``--checkpoint``, ``--bundle``) as an alias, so scripts written for the flag form keep
   working. The CLI (:func:`dvis_trt.runtime.cli.main`) calls :func:`resolve_main_arguments`
   after parsing (a command's ``run(args)`` calls it too, so tests may call ``run`` on
   ``parser.parse_args(...)`` directly; it is idempotent): positional and flag are merged into one attribute (``args.bundle``), a
   missing one is one clear line, and a main object of the wrong kind is recognised
   (:func:`kind_of`) — when another argument has the kind that was expected, the message
   gives the command the user meant (``video.mp4 is a video and bundle/ is a bundle: did you
   mean `dvis-trt run bundle/ video.mp4`?``).
2. **Every option has help text** (``tests/test_cli_convention.py`` walks every sub-parser and
   fails on an option without one). Say the unit and the default: ``"... (default 4)"``.
3. **Secondary objects are options**: ``--config``, ``--output/-o``, ``--overlay``; keep a
   renamed flag as an alias in the same ``add_argument`` call (``"--config", "--config-file"``)
   rather than a second option.
4. **Missing optional packages**: import heavy packages inside ``run``, never in
   ``add_arguments`` (``dvis-trt X --help`` must work on the edge install), and let
   :func:`dvis_trt.runtime.extras.require` say which extra to install.
5. Bad input raises :class:`~dvis_trt.errors.InputError` (one line, exit 2).

Example for a new verb::

    from dvis_trt.runtime.cli_args import add_main_argument

    def add_arguments(parser):
        add_main_argument(parser, "bundle", kind="bundle", metavar="BUNDLE",
                          help="bundle folder (dvis-trt export)")
        parser.add_argument("--foo", type=int, default=3, help="what foo does (default 3)")
"""
from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from dvis_trt.errors import InputError

__all__ = ["add_main_argument", "resolve_main_arguments", "kind_of", "describe_kind",
           "suggest_swap", "MainSpec", "VIDEO_SUFFIXES", "IMAGE_SUFFIXES"]

#: File suffixes taken for videos (what FFmpeg usually reads) and for still images.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                  ".flv", ".wmv", ".3gp", ".ogv", ".y4m", ".gif")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_CHECKPOINT_SUFFIXES = (".pth", ".pkl", ".pt", ".ckpt", ".bin", ".safetensors")

_KIND_WORDS = {"bundle": "a bundle", "video": "a video", "frames": "a folder of frames",
               "checkpoint": "a checkpoint", "config": "a config file", "json": "a JSON file",
               "onnx": "an ONNX graph", "engine": "a TensorRT engine", "image": "an image",
               "folder": "a folder", "file": "a file", "missing": "not found"}


def kind_of(path: str) -> str:
    """What ``path`` looks like, from the file system (cheap: no file is opened).

    Returns one of ``"bundle"`` (a folder with ``manifest.json``), ``"frames"`` (a folder
    holding images or sub-folders of images), ``"folder"``, ``"video"``, ``"image"``,
    ``"checkpoint"`` (.pth/.pkl/.pt/...), ``"config"`` (.yaml/.yml), ``"json"``, ``"onnx"``,
    ``"engine"``, ``"file"`` (anything else) or ``"missing"``.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return "bundle"
        try:
            entries = list(p.iterdir())[:200]
        except OSError:
            return "folder"
        if any(e.suffix.lower() in IMAGE_SUFFIXES for e in entries if e.is_file()):
            return "frames"
        return "folder"
    suffix = p.suffix.lower()
    if not p.exists():
        return "missing"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in _CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if suffix in (".yaml", ".yml"):
        return "config"
    if suffix == ".json":
        return "json"
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".engine", ".plan", ".trt"):
        return "engine"
    return "file"


def describe_kind(kind: str) -> str:
    """``"video"`` -> ``"a video"`` (for messages)."""
    return _KIND_WORDS.get(kind, f"a {kind}")


@dataclass
class MainSpec:
    """How one verb's main object is given (see :func:`add_main_argument`)."""

    dest: str
    kind: str
    metavar: str
    flags: Tuple[str, ...]
    spill: Optional[str] = None       # positional list the positional value joins when the flag is used
    related: Tuple[str, ...] = ()     # other attributes that may hold the main object by mistake
    required: bool = True
    accepts: Tuple[str, ...] = field(default_factory=tuple)  # further kinds that are fine

    @property
    def flag_dest(self) -> str:
        return f"{self.dest}__flag"


def add_main_argument(parser: argparse.ArgumentParser, dest: str, *, kind: str, metavar: str,
                      help: str, flags: Sequence[str] = (), spill: Optional[str] = None,
                      related: Sequence[str] = (), required: bool = True,
                      accepts: Sequence[str] = ()) -> MainSpec:
    """Add a verb's main object: a positional ``dest`` plus ``flags`` as aliases.

    Args:
        dest: attribute the merged value ends up in (``args.bundle``).
        kind: what :func:`kind_of` should say about it (``"bundle"``, ``"checkpoint"``); a value
            of another existing kind is refused with a message (see module docstring).
        flags: older option spellings kept as aliases (``("--bundle",)``).
        spill: name of a later ``nargs="*"`` positional (``"inputs"``): when the flag gives the
            main object, the first positional word belongs to that list instead.
        related: attributes holding other paths of the command (``("inputs",)``, ``("checkpoint",)``)
            searched for the main object when the one given has the wrong kind.
        required: refuse a command line without it.
        accepts: other kinds that are fine too (``"missing"`` is always left to the command).
    Returns:
        the :class:`MainSpec`, also recorded on the parser's defaults (``_main_specs``).
    """
    spec = MainSpec(dest=dest, kind=kind, metavar=metavar, flags=tuple(flags), spill=spill,
                    related=tuple(related), required=required, accepts=tuple(accepts))
    parser.add_argument(dest, nargs="?", default=None, metavar=metavar, help=help)
    if flags:
        parser.add_argument(*flags, dest=spec.flag_dest, default=None, metavar=metavar,
                            help=f"same as the positional {metavar} (the older spelling, kept)")
    specs = list(parser.get_default("_main_specs") or [])
    parser.set_defaults(_main_specs=specs + [spec])
    return spec


def _command_text(argv: Sequence[str]) -> str:
    return "dvis-trt " + " ".join(shlex.quote(a) for a in argv)


def suggest_swap(argv: Optional[Sequence[str]], a: str, b: str) -> Optional[str]:
    """The command line ``argv`` with the words ``a`` and ``b`` exchanged, as text (or None)."""
    if not argv:
        return None
    words = list(argv)
    try:
        i, j = words.index(a), words.index(b)
    except ValueError:
        return None
    words[i], words[j] = words[j], words[i]
    return _command_text(words)


def _as_list(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def check_kind(spec: MainSpec, value: str, args: argparse.Namespace,
               argv: Optional[Sequence[str]], verb: str) -> None:
    """Refuse a main object of the wrong kind; suggest the swap when another argument fits."""
    got = kind_of(value)
    if got in (spec.kind, "missing") or got in spec.accepts:
        return
    for name in spec.related:
        for other in _as_list(getattr(args, name, None)):
            if other != value and kind_of(other) == spec.kind:
                fixed = suggest_swap(argv, value, other)
                hint = f": did you mean `{fixed}`?" if fixed else \
                    f"; give the {spec.kind} first: `dvis-trt {verb} {other} ...`"
                raise InputError(f"{value} is {describe_kind(got)} and {other} is "
                                 f"{describe_kind(spec.kind)}{hint}")
    raise InputError(f"{value} is {describe_kind(got)}, not {describe_kind(spec.kind)}; "
                     f"usage: dvis-trt {verb} {spec.metavar} ... (see `dvis-trt {verb} --help`)")


def resolve_main_arguments(args: argparse.Namespace, argv: Optional[Sequence[str]] = None,
                           verb: Optional[str] = None) -> argparse.Namespace:
    """Merge each main object's positional and flag forms into ``args.<dest>`` and check it.

    Raises:
        InputError: the main object is missing, given twice with different values, or of
            the wrong kind (with the corrected command when another argument fits).
    """
    verb = verb or getattr(args, "command", None) or "COMMAND"
    argv = argv if argv is not None else getattr(args, "_argv", None)
    for spec in getattr(args, "_main_specs", None) or []:
        if spec.flags and not hasattr(args, spec.flag_dest):
            continue  # resolved already (the CLI does it before the command's run())
        pos = getattr(args, spec.dest, None)
        flag = getattr(args, spec.flag_dest, None)
        if flag is not None:
            if pos is not None:
                if spec.spill is not None:  # `run --bundle B video.mp4`: video is an input
                    setattr(args, spec.spill, [pos] + list(getattr(args, spec.spill, None) or []))
                elif pos != flag:
                    raise InputError(f"{spec.metavar} given twice ({pos} and {flag_name(spec)} "
                                     f"{flag}); give it once: `dvis-trt {verb} {flag} ...`")
            pos = flag
        if hasattr(args, spec.flag_dest):
            delattr(args, spec.flag_dest)
        setattr(args, spec.dest, pos)
        if pos is None:
            if spec.required:
                raise InputError(f"missing {spec.metavar}: `dvis-trt {verb} {spec.metavar} ...` "
                                 f"(see `dvis-trt {verb} --help`)")
            continue
        check_kind(spec, str(pos), args, argv, verb)
    return args


def flag_name(spec: MainSpec) -> str:
    return spec.flags[0] if spec.flags else spec.metavar


def resolve_bundles_and_video(paths: Sequence[str], bundles: Optional[Sequence[str]],
                              video: Optional[str], argv: Optional[Sequence[str]],
                              verb: str = "bench") -> Tuple[List[str], str]:
    """``bench BUNDLE... VIDEO`` with the older ``--bundle B [--bundle B2] --video V`` kept.

    Positional words that are bundles (:func:`kind_of`) join ``bundles``; the one that is not
    is the video (unless ``--video`` gave it). A video before a bundle is recognised and the
    corrected command suggested.

    Returns:
        ``(bundles, video)``.
    Raises:
        InputError: no bundle, no video, two videos, or arguments in the wrong order.
    """
    bundles = list(bundles or [])
    others: List[str] = []
    for word in paths or []:
        (bundles if kind_of(word) == "bundle" else others).append(word)
    if video is None and others:
        video = others.pop(-1)
    if others:
        raise InputError(f"{', '.join(others)}: not a bundle (no manifest.json) and the video is "
                         f"already {video}; usage: dvis-trt {verb} BUNDLE [BUNDLE...] VIDEO")
    if not bundles:
        raise InputError(f"missing BUNDLE: `dvis-trt {verb} BUNDLE [BUNDLE...] VIDEO` (a bundle "
                         "is the folder `dvis-trt export` writes)")
    if video is None:
        raise InputError(f"missing VIDEO: `dvis-trt {verb} {bundles[0]} VIDEO`")
    positional = list(paths or [])
    if video in positional and any(b in positional and positional.index(b) > positional.index(video)
                                   for b in bundles):
        later = next(b for b in bundles if b in positional and
                     positional.index(b) > positional.index(video))
        fixed = None
        if argv:
            words = [w for w in argv if w != video]
            words.insert(max(i for i, w in enumerate(words) if w in bundles) + 1, video)
            fixed = _command_text(words)
        raise InputError(f"{video} is {describe_kind(kind_of(video))} and {later} is a bundle"
                         + (f": did you mean `{fixed}`?" if fixed else
                            f"; give the bundles first: dvis-trt {verb} BUNDLE... VIDEO"))
    return bundles, video
