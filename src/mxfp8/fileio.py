"""Durable file writes shared by every floor: fsync helpers and the atomic replace.

A run directory must never lie after a crash (docs/reliability.md), so each file a run
rewrites is replaced in one step: write a temporary file next to it, flush it to disk, rename
it over the target, flush the directory. A kill at any moment leaves the old content or the
new one. This module imports nothing from the package, so any floor may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, new files) to disk; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def replace_atomically(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Give ``path`` the content ``chunks`` (bytes) in one rename; see the module docstring.

    The temporary file is ``.NAME.tmp`` next to ``path``: removed on failure, and harmless if
    a kill leaves it (the next write overwrites it, and no reader opens it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.writelines(chunks)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomically(path: str | Path, text: str) -> None:
    """:func:`replace_atomically` for a text file (UTF-8)."""
    replace_atomically(path, [text.encode("utf-8")])
