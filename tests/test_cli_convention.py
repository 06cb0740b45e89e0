"""The one CLI convention (runtime/cli_args.py): every option has help text, the main object is
positional with the older flag kept as an alias, swapped arguments are recognised, --version."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dvis_trt.runtime import cli
from dvis_trt.runtime.cli_args import kind_of
from dvis_trt.errors import InputError


def _sub_parsers():
    for name in cli.COMMANDS:
        try:
            parser = cli.build_parser(only=name)
        except Exception as exc:  # noqa: BLE001 - a command whose extra is missing here
            if "not installed" in str(exc):
                continue
            raise
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        yield name, sub.choices[name]


def test_every_option_of_every_command_has_help():
    missing = []
    walked = 0
    for name, parser in _sub_parsers():
        walked += 1
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"dvis-trt {name} {'/'.join(action.option_strings) or action.dest}")
    assert walked >= 7
    assert not missing, "options without help text: " + ", ".join(missing)
    top = cli.build_parser()
    assert all(a.help for a in top._actions)


@pytest.fixture()
def paths(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({}))
    video = tmp_path / "video.mp4"
    video.write_bytes(b"\0" * 16)
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"\0")
    return bundle, video, ckpt


def test_kinds(paths, tmp_path):
    bundle, video, ckpt = paths
    assert [kind_of(p) for p in (bundle, video, ckpt, tmp_path / "nope.mp4")] == \
        ["bundle", "video", "checkpoint", "missing"]


def _parse(argv):
    command = argv[0]
    args = cli.build_parser(only=command).parse_args(argv)
    return cli.resolve_main_arguments(args, argv, command)


@pytest.mark.parametrize("form", ["positional", "flag"])
def test_run_positional_and_alias_agree(paths, form):
    bundle, video, _ = paths
    argv = ["run", str(bundle), str(video)] if form == "positional" else \
        ["run", "--bundle", str(bundle), str(video)]
    args = _parse(argv)
    assert args.bundle == str(bundle) and args.inputs == [str(video)]


@pytest.mark.parametrize("command", ["check", "build"])
def test_bundle_flag_alias(paths, command):
    bundle, _, _ = paths
    assert _parse([command, "--bundle", str(bundle)]).bundle == str(bundle)
    assert _parse([command, str(bundle)]).bundle == str(bundle)


def test_export_positional_checkpoint_and_aliases(paths, tmp_path):
    pytest.importorskip("torch")
    _, _, ckpt = paths
    a = _parse(["export", str(ckpt), "--config", "r50-ovis", "-o", str(tmp_path / "b")])
    b = _parse(["export", "--checkpoint", str(ckpt), "--config-file", "r50-ovis",
                "--output", str(tmp_path / "b")])
    assert (a.checkpoint, a.config_file, a.output) == (b.checkpoint, b.config_file, b.output)


def test_swapped_run_arguments_say_what_was_meant(paths):
    bundle, video, _ = paths
    with pytest.raises(InputError) as err:
        _parse(["run", str(video), str(bundle)])
    msg = str(err.value)
    assert msg == (f"{video} is a video and {bundle} is a bundle: did you mean "
                   f"`dvis-trt run {bundle} {video}`?")


def test_swapped_arguments_through_main(paths, capsys):
    bundle, video, _ = paths
    assert cli.main(["run", str(video), str(bundle), "-o", "r.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"did you mean `dvis-trt run {bundle} {video} -o r.json`" in err


def test_check_given_a_checkpoint_and_a_bundle_swapped(paths):
    bundle, _, ckpt = paths
    with pytest.raises(InputError, match=r"model\.pth is a checkpoint and .*bundle is a bundle: "
                                         r"did you mean `dvis-trt check .*bundle --checkpoint"):
        _parse(["check", str(ckpt), "--checkpoint", str(bundle)])


def test_wrong_kind_without_a_swap_partner(paths):
    _, video, _ = paths
    with pytest.raises(InputError, match="is a video, not a bundle; usage: dvis-trt run BUNDLE"):
        _parse(["run", str(video)])


def test_missing_main_object(paths):
    with pytest.raises(InputError, match=r"missing BUNDLE: `dvis-trt check BUNDLE"):
        _parse(["check"])


def test_bench_positional_bundles_and_video(paths, tmp_path):
    from dvis_trt.runtime.cli_args import resolve_bundles_and_video
    bundle, video, _ = paths
    b2 = tmp_path / "b2"
    b2.mkdir()
    (b2 / "manifest.json").write_text("{}")
    assert resolve_bundles_and_video([str(bundle), str(b2), str(video)], None, None, None) == \
        ([str(bundle), str(b2)], str(video))
    assert resolve_bundles_and_video([], [str(bundle)], str(video), None) == \
        ([str(bundle)], str(video))
    argv = ["bench", str(video), str(bundle), "--backends", "ort"]
    with pytest.raises(InputError) as err:
        resolve_bundles_and_video([str(video), str(bundle)], None, None, argv)
    assert str(err.value) == (f"{video} is a video and {bundle} is a bundle: did you mean "
                              f"`dvis-trt bench {bundle} {video} --backends ort`?")


def test_version_lists_the_stack(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("dvis-trt ")
    for word in ("onnxruntime", "torch", "tensorrt", "plugin"):
        assert f"  {word}" in out
