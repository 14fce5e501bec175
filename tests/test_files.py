"""Result files are written whole or not at all (pfadseg.files)."""
from __future__ import annotations

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
