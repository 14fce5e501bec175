"""Files written whole or not at all: a result file is either the old one or the
new one, never half-written, whatever stops the process (an interrupt, a full disk)."""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to: renamed over `path` when the
    block ends, removed when it raises (a rename within one folder is atomic). A
    link is written through, and a file that is there keeps its permissions. The
    temporary name holds the process id: two processes of one machine writing one
    file (two calibrations of a checkpoint) do not write into each other's."""
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if path.is_file():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno and exc.filename is None:  # a full disk: name the file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)` (UTF-8), atomically. A file name that is not UTF-8
    (it reaches Python as surrogates) is written as its own bytes, so the path
    written opens the file."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
