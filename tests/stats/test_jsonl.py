"""The run directory's JSON-lines files: one reader that skips torn lines with a warning, and
one atomic repair (resume truncation) that leaves appends on a line of their own."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest

from mxfp8.stats import jsonl
from mxfp8.stats.jsonl import CorruptLineWarning, append_rows, read_rows, truncate_after


def _lines(*rows):
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()


@pytest.fixture
def torn(tmp_path):
    """numerics.jsonl of a run killed while writing step 3's row."""
    path = tmp_path / "numerics.jsonl"
    path.write_bytes(_lines({"step": 1}, {"step": 2}) + b'{"step":3,"layer":"blocks.0.at')
    return path


def test_missing_file_reads_empty(tmp_path):
    assert read_rows(tmp_path / "none.jsonl") == []
    truncate_after(tmp_path / "none.jsonl", 3)
    assert not (tmp_path / "none.jsonl").exists()


def test_torn_last_line_is_skipped_with_a_warning(torn):
    expect = r"numerics\.jsonl: skipped line 3, not a JSON object \(torn last line"
    with pytest.warns(CorruptLineWarning, match=expect):
        assert read_rows(torn) == [{"step": 1}, {"step": 2}]


def test_bad_lines_are_named_in_one_warning(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(_lines({"step": 1}) + b"[1, 2]\nnot json\n" * 10 + _lines({"step": 9}))
    with pytest.warns(CorruptLineWarning) as record:
        assert read_rows(path) == [{"step": 1}, {"step": 9}]
    assert len(record) == 1
    msg = str(record[0].message)
    assert "events.jsonl: skipped 20 lines" in msg and "lines 2, 3, 4, 5, 6 and 15 more" in msg


def test_line_cut_inside_a_utf8_character_is_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_lines({"step": 1}) + '{"step":2,"note":"é'.encode()[:-1])
    with pytest.warns(CorruptLineWarning, match="line 2"):
        assert read_rows(path) == [{"step": 1}]


def test_resume_truncate_then_append_reads_back_every_row(torn):
    with pytest.warns(CorruptLineWarning, match="line 3"):
        truncate_after(torn, 5)
    assert torn.read_bytes() == _lines({"step": 1}, {"step": 2})
    append_rows(torn, [{"step": 3}, {"step": 4}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_rows(torn)] == [1, 2, 3, 4]


def test_append_after_a_torn_tail_drops_it_first(torn):
    """Without a resume truncation (a writer that never truncates): the new row is not glued
    to the torn one, which would lose it too."""
    with pytest.warns(CorruptLineWarning, match="line 3"):
        append_rows(torn, [{"step": 3}])
    assert [r["step"] for r in read_rows(torn)] == [1, 2, 3]


def test_row_that_lost_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(_lines({"step": 1}) + b'{"step":2}')
    append_rows(path, [{"step": 3}])
    assert [r["step"] for r in read_rows(path)] == [1, 2, 3]
    path.write_bytes(_lines({"step": 1}) + b'{"step":2}')
    truncate_after(path, 2)
    assert path.read_bytes() == _lines({"step": 1}, {"step": 2})


def test_truncate_after_keeps_rows_verbatim(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = b'{"step": 1, "loss": NaN}\n{"step": 2,   "x": 0.1}\n{"step": 3}\n{"kind": "no step"}\n'
    path.write_bytes(rows)
    truncate_after(path, 2)
    assert path.read_bytes() == b'{"step": 1, "loss": NaN}\n{"step": 2,   "x": 0.1}\n' + (
        b'{"kind": "no step"}\n'
    )


def test_truncate_after_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = _lines({"step": 1}, {"step": 2}, {"step": 3})
    path.write_bytes(original)

    def killed(src, dst):  # the process dies just before the rename
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        truncate_after(path, 1)
    assert path.read_bytes() == original  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    monkeypatch.undo()
    inode = path.stat().st_ino
    truncate_after(path, 1)
    assert path.read_bytes() == _lines({"step": 1})
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not a rewrite


def test_truncate_after_leaves_a_clean_file_alone(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_lines({"step": 1}, {"step": 2}))

    def rewrite(*args):
        raise AssertionError("a clean file was rewritten")

    monkeypatch.setattr(jsonl, "_replace", rewrite)
    truncate_after(path, 2)
    assert path.read_bytes() == _lines({"step": 1}, {"step": 2})


def test_append_rows_writes_compact_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    append_rows(path, [{"step": 1, "x": [1, 2]}])
    append_rows(path, [])
    assert path.read_bytes() == b'{"step":1,"x":[1,2]}\n'
    append_rows(path, [{"step": 2, "x": float("nan")}])  # written, not refused (see below)
    second = b'{"step":2,"x":null,"nonfinite_values":{"x":"nan"}}\n'
    assert path.read_bytes() == b'{"step":1,"x":[1,2]}\n' + second


def test_non_finite_values_are_written_as_null_with_a_flag_and_read_back(tmp_path):
    """Strict JSON on disk (no NaN/Infinity tokens, which most readers refuse), the values
    named beside their null at every depth, and read_rows gives the floats back."""
    path = tmp_path / "x.jsonl"
    row = {"step": 3, "loss": float("nan"), "ok": 1.5, "none": None,
           "detail": {"amax": float("inf"), "low": -math.inf, "fine": 2.0},
           "layers": [{"sqnr_db": float("nan")}]}  # fmt: skip
    append_rows(path, [row])

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    on_disk = json.loads(path.read_text(), parse_constant=refuse)
    assert on_disk == {
        "step": 3, "loss": None, "ok": 1.5, "none": None,
        "detail": {"amax": None, "low": None, "fine": 2.0,
                   "nonfinite_values": {"amax": "inf", "low": "-inf"}},
        "layers": [{"sqnr_db": None, "nonfinite_values": {"sqnr_db": "nan"}}],
        "nonfinite_values": {"loss": "nan"},
    }  # fmt: skip
    (back,) = read_rows(path)
    assert math.isnan(back["loss"]) and math.isnan(back["layers"][0]["sqnr_db"])
    assert back["detail"] == {"amax": math.inf, "low": -math.inf, "fine": 2.0}
    assert back["none"] is None and back["ok"] == 1.5 and "nonfinite_values" not in back
