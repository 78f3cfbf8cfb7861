"""Append-only JSON-lines files of a run directory, and their repair on resume.

Every ``.jsonl`` file of a run (``metrics.jsonl``, ``numerics.jsonl``, ``events.jsonl``) is read
by :func:`read_rows` and repaired by :func:`truncate_after`, whoever wrote it: one reader, so a
torn line is treated the same way by training, the stats hooks and the reports, and one
rewrite, so that no file is ever rewritten in place (a kill during an in-place rewrite loses
the file; a kill during :func:`truncate_after` leaves the old file or the new one).

A process killed mid-write leaves at most one torn line, the last, usually without its
newline. Readers skip it with a :class:`CorruptLineWarning` naming the file and the line;
writers drop it before appending (:func:`append_rows`, :func:`truncate_after`), else the next
row would be glued to it and lost as well.

Every line is strict JSON, which has no NaN or infinity: a non-finite float is written as
``null`` and named, with its value, in the ``nonfinite_values`` object of the same JSON object
(``{"loss": null, "nonfinite_values": {"loss": "nan"}}``; ``"nan"``, ``"inf"`` or ``"-inf"``),
at whatever depth it sits (:func:`encode_row`). :func:`read_rows` puts the floats back, so the
package's own readers see the NaN a run logged; any other reader (jq, pandas, a browser) gets
a valid line with an explicit null.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mxfp8.fileio import replace_atomically

# at most this many bad line numbers are named in one warning (a binary file has thousands)
_NAMED_LINES = 5
NONFINITE_KEY = "nonfinite_values"  # key -> "nan" | "inf" | "-inf" of the values written null
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _name(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def encode_row(row: Any) -> Any:
    """``row`` with every non-finite float replaced by None and named in the
    ``nonfinite_values`` of the object holding it (a list element is written null unnamed:
    no row the package writes holds a bare float list). Finite rows come back unchanged."""
    if isinstance(row, dict):
        out, flags = {}, {}
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k], flags[k] = None, _name(v)
            else:
                out[k] = encode_row(v)
        if flags:
            out[NONFINITE_KEY] = {**out.get(NONFINITE_KEY, {}), **flags}
        return out
    if isinstance(row, list | tuple):
        return [None if isinstance(v, float) and not math.isfinite(v) else encode_row(v)
                for v in row]  # fmt: skip
    return row


def decode_row(row: Any) -> Any:
    """The inverse of :func:`encode_row`: the named values are floats again."""
    if isinstance(row, dict):
        flags = row.get(NONFINITE_KEY)
        out = {k: decode_row(v) for k, v in row.items() if k != NONFINITE_KEY}
        if isinstance(flags, dict):
            for k, name in flags.items():
                if k in out and out[k] is None and name in _FLOATS:
                    out[k] = _FLOATS[name]
        return out
    if isinstance(row, list):
        return [decode_row(v) for v in row]
    return row


def dumps(row: dict[str, Any]) -> str:
    """One strict-JSON line (no newline) of ``row``, compact, non-finite floats encoded."""
    return json.dumps(encode_row(row), separators=(",", ":"), allow_nan=False)


class CorruptLineWarning(UserWarning):
    """A line of a .jsonl file that is not a JSON object (torn by a crash, or corrupted) was
    skipped."""


def _scan(path: Path) -> tuple[list[tuple[bytes, dict[str, Any]]], bool] | None:
    """``(rows, clean)`` of a .jsonl file, None if it does not exist.

    ``rows`` pairs each JSON object with its line (newline-terminated, verbatim otherwise, so
    that a repair copies kept rows byte for byte instead of re-serializing them); ``clean`` is
    False when a repair would change the file (a bad line, or a last line without newline).
    Lines are read as bytes: a line cut inside a multi-byte character is a bad line, not a
    UnicodeDecodeError that would fail the whole read.
    """
    try:
        fh = path.open("rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    rows: list[tuple[bytes, dict[str, Any]]] = []
    bad: list[tuple[int, bool]] = []  # (line number, torn: the last line, without newline)
    clean = True
    with fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            torn = not raw.endswith(b"\n")
            try:
                obj = json.loads(raw)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                obj = None
            if torn:
                clean = False
                raw += b"\n"
            if isinstance(obj, dict):
                rows.append((raw, obj))
            else:
                bad.append((n, torn))
                clean = False
    if bad:
        _warn_bad_lines(path, bad)
    return rows, clean


def _warn_bad_lines(path: Path, bad: list[tuple[int, bool]]) -> None:
    named = ", ".join(
        f"{n} (torn last line: a process killed mid-write?)" if torn else str(n)
        for n, torn in bad[:_NAMED_LINES]
    )
    if len(bad) == 1:
        n, torn = bad[0]
        note = " (torn last line: a process killed mid-write?)" if torn else ""
        msg = f"{path}: skipped line {n}, not a JSON object{note}"
    else:
        more = f" and {len(bad) - _NAMED_LINES} more" if len(bad) > _NAMED_LINES else ""
        msg = f"{path}: skipped {len(bad)} lines that are not JSON objects: lines {named}{more}"
    warnings.warn(msg, CorruptLineWarning, stacklevel=4)  # the caller of read_rows & co


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file ([] if missing), non-finite values decoded (see the
    module doc). Lines that are not JSON objects (a torn last line) are skipped with a
    :class:`CorruptLineWarning`."""
    scan = _scan(Path(path))
    return [] if scan is None else [decode_row(obj) for _, obj in scan[0]]


def _replace(path: Path, lines: Iterable[bytes]) -> None:
    """Give ``path`` the content ``lines`` atomically (:mod:`mxfp8.fileio`): a kill at any
    point leaves either the old file or the new one."""
    replace_atomically(path, lines)


def _step(row: dict[str, Any]) -> float:
    step = row.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int | float) or math.isnan(step):
        return 0  # a row without a usable step is kept, as a row of step 0 would be
    return step


def truncate_after(path: Path, step: int | float) -> None:
    """Drop rows past ``step``: what an interrupted process wrote after its last checkpoint,
    which the resumed run will write again (so the file reads as one uninterrupted run).

    Torn or corrupted lines are dropped too (with a warning), and a last row that lost only
    its newline gets it back, so the next append starts on a line of its own. The file is
    replaced atomically, and only when something changes (a resume at the last logged step
    of a clean file costs one read).
    """
    path = Path(path)
    scan = _scan(path)
    if scan is None:
        return
    rows, clean = scan
    kept = [raw for raw, obj in rows if _step(obj) <= step]
    if clean and len(kept) == len(rows):
        return
    _replace(path, kept)


def _ends_cleanly(path: Path) -> bool:
    """The file is missing, empty or ends with a newline (costs a seek and a one-byte read)."""
    try:
        with path.open("rb") as fh:
            if fh.seek(0, os.SEEK_END) == 0:
                return True
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
    except FileNotFoundError:
        return True


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append compact strict-JSON lines (:func:`dumps`: non-finite floats encoded).

    A file that does not end with a newline was torn by a crash: it is repaired first
    (:func:`truncate_after` with no step limit), so the new rows are not glued to the torn
    line, which would make them unreadable too.
    """
    path = Path(path)
    if not _ends_cleanly(path):
        truncate_after(path, math.inf)
    with path.open("a", encoding="utf-8") as fh:
        fh.writelines(dumps(r) + "\n" for r in rows)
