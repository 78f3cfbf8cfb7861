"""Append-only JSON-lines files of a run directory, and their repair on resume."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file ([] if missing); a torn last line is skipped."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append compact JSON lines (no spaces; NaN/inf must already be None)."""
    with path.open("a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in rows)


def truncate_after(path: Path, step: int) -> None:
    """Drop rows past ``step``: what an interrupted process wrote after its last checkpoint,
    which the resumed run will write again (so the file reads as one uninterrupted run)."""
    if not path.is_file():
        return
    kept = [r for r in read_rows(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))
    tmp.replace(path)
