"""Result files are written whole or not at all (pfadseg.files)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pfadseg.files import replacing, write_text


def test_a_write_that_fails_half_way_keeps_the_old_file_and_leaves_no_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_text(path, '{"done": 1}')
    with pytest.raises(KeyboardInterrupt), replacing(path) as tmp:
        tmp.write_text('{"do')  # cut short, as by Ctrl-C or a full disk
        raise KeyboardInterrupt
    assert path.read_text() == '{"done": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_finished_write_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    write_text(path, "old\n")
    write_text(path, "name,score\nä.png,0.5\n")
    assert path.read_text(encoding="utf-8") == "name,score\nä.png,0.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_a_shared_file_keeps_its_permissions_and_a_link_is_written_through(tmp_path: Path) -> None:
    shared = tmp_path / "shared.md"
    shared.write_text("old")
    shared.chmod(0o664)  # a team's folder: group-writable
    link = tmp_path / "results.md"
    link.symlink_to(shared)
    write_text(link, "new")
    assert link.is_symlink() and shared.read_text() == "new"
    assert shared.stat().st_mode & 0o777 == 0o664


def test_a_failed_write_names_its_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    with pytest.raises(OSError, match="No space left on device: '.*summary.json'"), replacing(path):
        raise OSError(28, "No space left on device")  # what a full disk gives, without a name


def test_two_processes_writing_one_file_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Two calibrations of one checkpoint wrote the same <file>.tmp: one could rename the
    other's half-written file into place."""
    path = tmp_path / "checkpoint.calibrated.safetensors"
    with replacing(path) as tmp:
        assert tmp.parent == tmp_path and f".{os.getpid()}." in tmp.name
        tmp.write_bytes(b"x")
    assert path.read_bytes() == b"x"
