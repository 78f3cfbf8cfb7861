"""metrics.jsonl on resume: atomic truncation, torn lines, and one reader for everyone."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest

from mxfp8.report.loader import read_jsonl
from mxfp8.stats.jsonl import CorruptLineWarning, read_rows
from mxfp8.train.runlog import METRICS_FILE, RunLog, read_metrics


def _metrics(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps).encode()


def _row(step):
    return {"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 1.0}


def test_resume_after_a_torn_metrics_line(tmp_path):
    """A run killed mid-line at step 5, resumed from its step-3 checkpoint."""
    path = tmp_path / METRICS_FILE
    path.write_bytes(_metrics(1, 2, 3, 4) + b'{"step": 5, "loss": 0.2')
    expect = r"metrics\.jsonl: skipped line 5, not a JSON object \(torn last line"
    with pytest.warns(CorruptLineWarning, match=expect):
        log = RunLog(tmp_path, total=10, start=3, progress=False)
    try:
        log.log(_row(4))
        log.log(_row(5))
    finally:
        log.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_torn_tail_without_rows_to_drop_is_still_repaired(tmp_path):
    """Killed mid-line right after the checkpoint's row: the torn line alone is dropped, and
    the next row starts on a line of its own."""
    path = tmp_path / METRICS_FILE
    path.write_bytes(_metrics(1, 2) + b'{"st')
    with pytest.warns(CorruptLineWarning):
        log = RunLog(tmp_path, total=10, start=2, progress=False)
    log.log(_row(3))
    log.close()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_resume_truncation_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / METRICS_FILE
    original = _metrics(1, 2, 3, 4)
    path.write_bytes(original)

    def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        RunLog(tmp_path, total=10, start=2, progress=False)
    assert path.read_bytes() == original
    monkeypatch.undo()
    inode = path.stat().st_ino
    RunLog(tmp_path, total=10, start=2, progress=False).close()
    assert path.read_bytes() == _metrics(1, 2) and path.stat().st_ino != inode


def test_fresh_start_empties_metrics(tmp_path):
    (tmp_path / METRICS_FILE).write_bytes(_metrics(1, 2))
    RunLog(tmp_path, total=10, start=0, progress=False).close()
    assert read_metrics(tmp_path) == []


@pytest.mark.parametrize(
    "reader",
    [
        pytest.param(lambda run: read_rows(run / METRICS_FILE), id="stats.jsonl.read_rows"),
        pytest.param(read_metrics, id="train.runlog.read_metrics"),
        pytest.param(lambda run: read_jsonl(run / METRICS_FILE), id="report.loader.read_jsonl"),
    ],
)
def test_every_reader_skips_a_torn_line_with_a_warning(tmp_path, reader):
    (tmp_path / METRICS_FILE).write_bytes(_metrics(1, 2) + b'{"step": 3, "lo')
    expect = re.escape(f"{tmp_path / METRICS_FILE}: skipped line 3")
    with pytest.warns(CorruptLineWarning, match=expect):
        assert [m["step"] for m in reader(tmp_path)] == [1, 2]
