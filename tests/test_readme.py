"""The README and docs/ stay true: the README's Python code runs as written, every
command line in them is one the CLI accepts, their links resolve, and the
paper-to-code map names files and functions that exist.

The Python code runs with two changes, so that it trains in seconds: every preset
is replaced by a schedule of a step per stage, and SMALL's substitutions shrink
the image size. Everything else (paths, calls, arguments) is the README's own.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfadseg import config
from pfadseg.cli import build_parser
from pfadseg.demo import demo_root

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAPER_TO_CODE = ROOT / "docs" / "paper-to-code.md"
MAX_README_LINES = 250  # issue 22: user documentation, not a measurement diary
SMALL = {"image_size=256": "image_size=64"}  # README text -> what the test runs
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`]+)`")
BOTTLE = demo_root() / "bottle"


def code_blocks(path: Path, language: str) -> list[str]:
    """The fenced code blocks of one language in a Markdown file, in order."""
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def command_lines(path: Path) -> list[str]:
    """The commands of a file's bash blocks: continuations joined, comments dropped."""
    lines = []
    for block in code_blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def pfadseg_args(line: str) -> list[str] | None:
    """The arguments after `pfadseg` (or `-m pfadseg`) in one command, else None."""
    for part in line.split("&&"):
        tokens = shlex.split(part)
        for i, token in enumerate(tokens):
            if token == "pfadseg" and (i == 0 or tokens[i - 1] == "-m"):
                return tokens[i + 1:]
    return None


def sub_commands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


@pytest.fixture
def readme_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding the files the README's Python code reads."""
    good = tmp_path / "my_parts" / "good"
    good.mkdir(parents=True)
    for path in sorted((BOTTLE / "train" / "good").iterdir())[:4]:
        shutil.copy(path, good / path.name)
    new = tmp_path / "my_parts" / "new"
    new.mkdir()
    Image.open(BOTTLE / "test" / "good" / "000.jpg").save(new / "001.png")
    Image.open(BOTTLE / "test" / "broken_large" / "000.jpg").save(new / "002.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_code_runs(readme_files: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str], one_thread) -> None:
    blocks = code_blocks(README, "python")
    assert blocks, "the README has no ```python block"
    for text in SMALL:
        assert any(text in block for block in blocks), f"SMALL is stale: {text!r} is not in the README"
    short = dataclasses.replace(config.PRESETS["tiny"], stage1_steps=1, stage2_steps=1, save_every=1000)
    for name in list(config.PRESETS):
        monkeypatch.setitem(config.PRESETS, name, short)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        for text, small in SMALL.items():
            block = block.replace(text, small)
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)

    assert (readme_files / "runs" / "parts" / "checkpoint.safetensors").is_file()
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["001.png", "002.png"]
    for name in ("001.png", "002.png"):
        size = Image.open(readme_files / "my_parts" / "new" / name).size
        assert Image.open(readme_files / f"overlay_{name}").size == size
        mask = Image.open(readme_files / f"mask_{name}")
        assert mask.size == size and set(np.unique(np.asarray(mask.convert("L")))) <= {0, 255}


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_command_lines_are_accepted_by_the_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for line in command_lines(path):
        args = pfadseg_args(line)
        if args is not None:
            try:
                parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"{path.name}: the CLI rejects `{line}`: {capsys.readouterr().err.strip()}")
        for script in re.findall(r"\bpython3? (benchmarks/\S+\.py)", line):
            assert (ROOT / script).is_file(), f"{path.name}: `{line}` runs a script that is gone"


def test_readme_shows_every_sub_command() -> None:
    shown = {args[0] for line in command_lines(README) if (args := pfadseg_args(line))}
    assert sub_commands() <= shown, f"no example of: {sorted(sub_commands() - shown)}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target in LINK.findall(path.read_text()):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            assert (path.parent / target.split("#")[0]).exists(), f"{path.name}: broken link {target}"


def test_paper_to_code_names_exist() -> None:
    """Each row of the map names files (column 2) that hold the names in column 3."""
    rows = 0
    for line in PAPER_TO_CODE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`pfadseg/"):
            continue
        rows += 1
        paths = CODE.findall(cells[1])
        modules = []
        for path in paths:
            assert (ROOT / path).is_file(), f"paper-to-code.md: {path} does not exist"
            modules.append(importlib.import_module(path.removesuffix(".py").replace("/", ".")))
        for name in CODE.findall(cells[2]):
            assert any(_resolves(m, name) for m in modules), f"paper-to-code.md: {name} is not in {paths}"
    assert rows >= 20


def _resolves(module: object, dotted: str) -> bool:
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
