"""`mxfp8 demo`: the default comparison's code path, shrunk to a very small model and run."""

from __future__ import annotations

import json
import random
import re

import pytest

from mxfp8.cli.demo import demo_dir, run_demo
from mxfp8.cli.main import main
from mxfp8.compare import DEFAULT_RECIPES

TINY = {
    "run.steps": 4, "model.n_layers": 1, "model.d_model": 64, "model.n_heads": 2,
    "model.n_kv_heads": 1, "model.ffn_hidden": 128, "data.vocab_size": 300,
    "run.batch_size": 2, "run.seq_len": 32, "run.eval_batches": 1, "run.progress": False,
    "run.compile_quantize": False,
}  # fmt: skip


def test_demo_compares_the_default_recipes_and_prints_table_and_report(
    tmp_path, capsys, one_thread
):
    rng = random.Random(0)
    words = ["the", "king", "queen", "sword", "night", "love", "death", "crown", "lord", "fair"]
    (tmp_path / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000))
    )
    data = {"data.source": str(tmp_path / "corpus.txt"), "data.cache_dir": str(tmp_path)}
    out = tmp_path / "demo"
    assert run_demo(out, {**TINY, **data}) == 0
    printed = capsys.readouterr().out
    assert set(DEFAULT_RECIPES) == {"bf16", "mxfp8"}
    for recipe in DEFAULT_RECIPES:
        summary = json.loads((out / recipe / "summary.json").read_text())
        assert summary["recipe"] == recipe and summary["steps"] == 4
    assert "val loss" in printed and "gap to bf16" in printed
    assert "tok/s" in printed and "wall s" in printed
    assert re.search(r"^bf16 +4 +\d+\.\d{4} +\d+\.\d{2} +baseline +\d+ +\d+\.\d$", printed, re.M), (
        printed
    )
    row = re.search(
        r"^mxfp8 +4 +(\d+\.\d{4}) +\d+\.\d{2} +([+-]\d+\.\d{2}) % +\d+ +\d+\.\d$", printed, re.M
    )
    assert row is not None, printed
    assert f"report: {out / 'report.html'}" in printed
    assert (out / "report.html").stat().st_size > 0


def test_demo_writes_into_a_fresh_timestamped_directory():
    assert re.fullmatch(r"demo-\d{8}-\d{6}", demo_dir().name)
    assert demo_dir().parent.name == "runs"


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out
