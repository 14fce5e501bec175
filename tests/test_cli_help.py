"""`pfadseg <command> --help` explains every option and shows every default."""
from __future__ import annotations

import argparse

import pytest

from pfadseg.cli import build_parser

FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction,
         argparse._HelpAction, argparse._VersionAction)


def commands() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser and each sub-command's parser, by name."""
    parser = build_parser()
    found = {"pfadseg": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]


def test_the_walk_sees_every_command() -> None:
    assert {"pfadseg", "train", "test", "predict", "export", "report", "demo"} <= set(commands())


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_option_has_help_and_shows_its_default(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = commands()[name]
    missing, hidden_default = [], []
    for action in options(parser):
        label = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(label)
        elif (not isinstance(action, FLAGS) and action.default not in (None, argparse.SUPPRESS)
              and "%(default)s" not in action.help):  # SUPPRESS: the global options after a command
            hidden_default.append(f"{label} (default {action.default!r})")
    assert not missing, f"pfadseg {name}: options without help: {missing}"
    assert not hidden_default, (f"pfadseg {name}: add (default: %(default)s) to the help of "
                                f"{hidden_default}")
    monkeypatch.setenv("COLUMNS", "1000")  # a narrow terminal breaks a default such as pfadseg-demo
    text = parser.format_help()  # every help string formats (a bare % would raise here)
    for action in options(parser):
        if not isinstance(action, FLAGS) and action.default not in (None, argparse.SUPPRESS):
            assert f"default: {action.default}" in " ".join(text.split())


def test_paths_given_with_a_tilde_mean_the_home_folder(tmp_path, monkeypatch) -> None:
    """The shell leaves ~ alone in --out=~/runs: the results went to a folder named "~"."""
    from pathlib import Path

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["predict", "--checkpoint=~/run/checkpoint.safetensors",
                                      "--out=~/preds", "~/new"])
    assert (args.checkpoint, args.out, args.inputs) == (
        tmp_path / "run" / "checkpoint.safetensors", tmp_path / "preds", [tmp_path / "new"])
    path_options = [a.dest for parser in commands().values() for a in options(parser) if a.type is Path]
    assert not path_options, f"options whose ~ is not expanded: {path_options}"
