"""`mxfp8 compare` end to end on a very small model: runs, report, skip, resume, guards."""

from __future__ import annotations

import json
import random

import pytest

from mxfp8.cli.main import main
from mxfp8.compare import default_telemetry_every
from mxfp8.train.config import load_config
from mxfp8.train.data import DataConfig, prepare_data
from mxfp8.train.golden import torch_threads

SMALL = [
    "--steps", "8", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "2",
    "--model.n_kv_heads", "1", "--model.ffn_hidden", "128", "--data.vocab_size", "512",
    "--run.batch_size", "4", "--run.seq_len", "32", "--run.eval_every", "4",
    "--run.eval_batches", "2", "--run.progress", "false", "--run.log_every", "1",
    "--run.compile_quantize", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A small local corpus (a BPE on it trains in a second) and its prepared cache."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = ("the a of to and in that is was he for it with as his on be at by had not "
             "block scale format gradient weight loss step layer model train").split()  # fmt: skip
    lines = (" ".join(rng.choice(words) for _ in range(12)) for _ in range(6000))
    (root / "corpus.txt").write_text("\n".join(lines))
    prepare_data(DataConfig(source=str(root / "corpus.txt"), vocab_size=512,
                            cache_dir=str(root)))  # fmt: skip
    return root


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here compares training numbers: one torch thread (tests/conftest.py)."""


def _args(out, cache, *extra):
    data = ["--data", str(cache / "corpus.txt"), "--data.cache_dir", str(cache)]
    return ["compare", "--out", str(out), *SMALL, *data, *extra]


def _losses(run_dir):
    return [(m["step"], m["loss"]) for m in map(json.loads, open(run_dir / "metrics.jsonl"))]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("cmp")
    with torch_threads(1):  # as in the tests below: same thread count, same numbers
        assert main(_args(out, cache, "--recipes", "bf16,mxfp8-floor")) == 0
    return out


def test_compare_writes_one_run_per_recipe_and_the_report(comparison, capsys):
    out = comparison
    for recipe in ("bf16", "mxfp8-floor"):
        summary = json.loads((out / recipe / "summary.json").read_text())
        assert summary["recipe"] == recipe and summary["steps"] == 8
    assert (out / "report.html").is_file() and (out / "plots" / "loss.png").is_file()
    assert json.loads((out / "comparison.json").read_text()) == {"recipes": ["bf16", "mxfp8-floor"]}
    # telemetry is on for the quantized run (every 8 // 4 = 2 steps), absent for bf16
    rows = [json.loads(x) for x in (out / "mxfp8-floor" / "numerics.jsonl").read_text().split()]
    assert sorted({r["step"] for r in rows}) == [2, 4, 6, 8]
    assert not (out / "bf16" / "numerics.jsonl").exists()
    assert any(r["saturated_pct"] > 0 for r in rows)  # the floor rule clips, visibly
    # same model, seed and data: the configs differ only in recipe and output directory
    cfgs = [load_config(out / r / "config.toml").to_dict() for r in ("bf16", "mxfp8-floor")]
    for c in cfgs:
        c["recipe"].pop("name")
        c["run"].pop("out")
    assert cfgs[0] == cfgs[1]


def test_a_finished_comparison_is_skipped(comparison, cache, capsys):
    before = (comparison / "bf16" / "metrics.jsonl").read_bytes()
    assert main(_args(comparison, cache, "--recipes", "bf16,mxfp8-floor")) == 0
    captured = capsys.readouterr()
    assert captured.err.count("already complete") == 2
    assert captured.out.strip().endswith(f"report: {comparison / 'report.html'}")
    assert (comparison / "bf16" / "metrics.jsonl").read_bytes() == before


def test_a_different_config_in_the_same_directory_is_refused(comparison, cache, capsys):
    assert main(_args(comparison, cache, "--recipes", "bf16", "--run.seed", "7")) == 2
    assert "different config" in capsys.readouterr().err


def test_bad_recipe_lists_are_refused(tmp_path, cache, capsys):
    assert main(_args(tmp_path, cache, "--recipes", "bf16,nope")) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert main(_args(tmp_path, cache, "--recipe", "mxfp8")) == 2
    assert "--recipes" in capsys.readouterr().err


def test_default_telemetry_interval():
    assert default_telemetry_every(2000) == 100
    assert default_telemetry_every(100) == 25
    assert default_telemetry_every(3) == 1


@pytest.mark.slow
def test_an_interrupted_comparison_resumes_to_the_same_curves(tmp_path, cache, comparison):
    out = tmp_path / "cmp"
    recipes = ("--recipes", "bf16,mxfp8-floor")
    assert main(_args(out, cache, *recipes, "--stop-after", "3")) == 0
    assert not (out / "bf16" / "summary.json").exists()
    assert main(_args(out, cache, *recipes)) == 0
    for recipe in ("bf16", "mxfp8-floor"):
        assert _losses(out / recipe) == _losses(comparison / recipe)
    assert (out / "mxfp8-floor" / "numerics.jsonl").read_text() == (
        comparison / "mxfp8-floor" / "numerics.jsonl"
    ).read_text()


def test_sigterm_stops_the_whole_comparison_and_it_resumes(tmp_path, cache, comparison,
                                                           monkeypatch, capsys):  # fmt: skip
    import os
    import signal

    import mxfp8.train.loop as loop
    from mxfp8.train.hooks import TrainHook

    class Preempt(TrainHook):
        def on_step_start(self, step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would

    original = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: original(cfg, hooks=[Preempt()]))
    out = tmp_path / "cmp"
    recipes = ("--recipes", "bf16,mxfp8-floor")
    assert main(_args(out, cache, *recipes)) == 143
    assert "stopped early by SIGTERM: bf16" in capsys.readouterr().err
    assert not (out / "mxfp8-floor").exists(), "the next recipe must not start"
    monkeypatch.setattr(loop, "train", original)
    assert main(_args(out, cache, *recipes)) == 0
    for recipe in ("bf16", "mxfp8-floor"):
        assert _losses(out / recipe) == _losses(comparison / recipe)


def test_eval_tasks_are_scored_once_and_shown(comparison, cache, capsys, tmp_path):
    items = [{"context": "the scale of the", "choices": ["block", "zebra quartz"], "label": 0},
             {"context": "loss step layer", "choices": ["model", "xylophone"], "label": 0},
             {"context": "a gradient", "choices": ["weight", "of the"], "label": 1}]  # fmt: skip
    task = tmp_path / "mini.jsonl"
    task.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    args = _args(comparison, cache, "--recipes", "bf16,mxfp8-floor", "--eval-tasks",
                 f"cloze,{task}")  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr()
    for recipe in ("bf16", "mxfp8-floor"):
        evals = json.loads((comparison / recipe / "eval.json").read_text())["evaluations"]
        assert len(evals) == 1 and evals[0]["recipe"] == recipe
        scores = evals[0]["tasks"]
        assert set(scores) == {"cloze", "mini"} and scores["cloze"]["items"] == 200
        assert scores["mini"]["items"] == 3 and 0 <= scores["mini"]["acc"] <= 1
        assert f"cloze acc {scores['cloze']['acc']:.3f}" in out.out
    assert "Evaluations" in (comparison / "report.html").read_text()
    assert main(args) == 0  # scored already: not again
    evals = json.loads((comparison / "bf16" / "eval.json").read_text())["evaluations"]
    assert len(evals) == 1
