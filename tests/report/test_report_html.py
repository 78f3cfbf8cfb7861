"""The loader, the plots and the HTML report, on synthetic run directories."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest
from runfactory import make_comparison, make_run

from mxfp8.cli.main import main
from mxfp8.report.html import summary_rows, write_report
from mxfp8.report.loader import load_run, load_runs, read_jsonl
from mxfp8.report.plots import relative_gap, smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_loader_orders_baseline_first_and_reads_every_file(tmp_path):
    runs = load_runs(make_comparison(tmp_path))
    assert [r.name for r in runs] == ["bf16", "fp8-tensorwise", "mxfp8", "mxfp8-floor"]
    floor = runs[3]
    assert floor.recipe == "mxfp8-floor"
    assert floor.config["run"]["telemetry_every"] == 20
    assert len(floor.metrics) == 60 and floor.events[0]["step"] == 30
    assert len(floor.numerics) == 3 * 4 * 6  # telemetry steps x layers x operands
    assert not floor.diverged and not runs[0].diverged  # a spike it recovered from
    assert runs[1].diverged  # fp8-tensorwise went NaN
    assert runs[0].numerics == []


def test_loader_follows_comparison_index(tmp_path):
    cmp_dir = make_comparison(tmp_path)
    order = ["mxfp8", "bf16", "mxfp8-floor", "fp8-tensorwise"]
    (cmp_dir / "comparison.json").write_text(json.dumps({"recipes": order}))
    assert [r.name for r in load_runs(cmp_dir)] == order


def test_truncated_last_line_is_skipped(tmp_path):
    run = make_run(tmp_path, "mxfp8", steps=10)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 11, "loss": 2.')  # a run killed mid-write
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 11))


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no run directory"):
        load_runs(tmp_path)


def test_smooth_keeps_nan_local_and_is_unbiased():
    out = smooth([2.0] * 5 + [float("nan")] + [2.0] * 5, span=4)
    assert np.isnan(out[5])
    np.testing.assert_array_equal(np.delete(out, 5), np.full(10, 2.0))
    # bias correction: the first point is the first value, not alpha * value
    assert smooth([3.0, 5.0], span=3)[0] == 3.0


def test_relative_gap_of_a_constant_offset(tmp_path):
    base = make_run(tmp_path / "a", "bf16", steps=40)
    other = make_run(tmp_path / "b", "mxfp8", steps=40)
    # same seed -> same noise; rewrite the loss as exactly 1.5 % above the baseline
    rows = read_jsonl(base / "metrics.jsonl")
    with (other / "metrics.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "loss": r["loss"] * 1.015}) + "\n")
    steps, gap = relative_gap(load_run(other), load_run(base))
    assert list(steps) == list(range(1, 41))
    np.testing.assert_allclose(gap, 1.5, rtol=1e-9)


def test_summary_rows_gap_matches_summary_files(tmp_path):
    cmp_dir = make_comparison(tmp_path)
    rows = {r["run"]: r for r in summary_rows(load_runs(cmp_dir))}
    base = json.loads((cmp_dir / "bf16" / "summary.json").read_text())["final_val_loss"]
    floor = json.loads((cmp_dir / "mxfp8-floor" / "summary.json").read_text())["final_val_loss"]
    assert rows["bf16"]["gap_pct"] is None
    assert rows["mxfp8-floor"]["gap_pct"] == pytest.approx((floor - base) / base * 100)
    assert rows["mxfp8-floor"]["val_ppl"] == pytest.approx(math.exp(floor))
    assert rows["mxfp8-floor"]["events"] == 1 and rows["mxfp8-floor"]["first_event_step"] == 30
    assert rows["fp8-tensorwise"]["diverged"] and rows["bf16"]["events"] == 0
    # a NaN run: the last finite validation loss, not a crash
    assert rows["fp8-tensorwise"]["val_loss"] is not None


def test_plots_cover_each_kind_of_run(comparison_report):
    cmp_dir, _ = comparison_report
    names = {p.stem for p in (cmp_dir / "plots").glob("*.png")}
    assert {"loss", "gap"} <= names
    for run in ("mxfp8", "mxfp8-floor"):
        assert {
            f"{run}_saturated_pct",
            f"{run}_underflow_pct",
            f"{run}_sqnr_db",
            f"{run}_scale_exp",
        } <= names
    assert "fp8-tensorwise_tensor_scale" in names
    assert not any(n.startswith("bf16_") for n in names)  # bf16 has no numerics


def test_write_report_embeds_the_png_files(comparison_report):
    cmp_dir, path = comparison_report
    assert path == cmp_dir / "report.html"
    page = path.read_text()
    pngs = sorted((cmp_dir / "plots").glob("*.png"))
    assert len(pngs) >= 2 + 4 * 2 + 1
    embedded = [
        base64.b64decode(d) for d in re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    ]
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)
    assert all(b.startswith(PNG_MAGIC) for b in embedded)
    assert "http://" not in page and "https://" not in page  # self-contained
    for text in ("mxfp8-floor", "Divergence flags", "blocks.1.mlp.up", "telemetry_every = 20"):
        assert text in page


def test_report_of_a_single_bf16_run(tmp_path):
    run = make_run(tmp_path, "bf16", steps=12, eval_every=4)
    page = write_report(run).read_text()
    assert "No bf16 run here" not in page  # it is the bf16 run: no gap, but no complaint
    assert "No numerics telemetry" in page


def test_cli_report_prints_the_path(tmp_path, capsys):
    run = make_run(tmp_path, "bf16", steps=5)
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert main(["report", str(run), "--output", str(out)]) == 0
    assert out.is_file() and (out.parent / "plots" / "loss.png").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
