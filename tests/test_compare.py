"""`mxfp8 compare` end to end on a very small model: runs, report, skip, resume, guards."""

from __future__ import annotations

import json
import random

import pytest

from mxfp8.cli.main import main
from mxfp8.compare import default_telemetry_every
from mxfp8.config.train_config import load_config
from mxfp8.data.prepare import DataConfig, prepare_data
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


def test_eval_tasks_are_scored_once_and_shown(comparison, cache, capsys, tmp_path, monkeypatch):
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
        # cloze takes up to 1000 items: here all that the small test split holds
        assert set(scores) == {"cloze", "mini"} and 200 < scores["cloze"]["items"] <= 1000
        assert scores["mini"]["items"] == 3 and scores["cloze"]["num_fewshot"] == 0
        # what compare scored is what `mxfp8 eval --tasks` gives on the run's final
        # checkpoint under its recipe, every number of it (a wrong checkpoint, recipe, split
        # or item count would differ; same batch size, so the same sums)
        ref = tmp_path / f"{recipe}-eval.json"
        assert main(["eval", str(comparison / recipe), "--tasks", f"cloze,{task}", "--no-lm",
                     "--batch-size", "16", "--out", str(ref)]) == 0  # fmt: skip
        by_eval = json.loads(ref.read_text())["evaluations"][0]
        assert by_eval["recipe"] == recipe and by_eval["tasks"] == scores
        row = next(x for x in out.out.splitlines() if x.startswith(f"{recipe} ") and " acc " in x)
        for name, t in scores.items():  # the table prints the scores of eval.json
            assert f"{name} acc {t['acc']:.3f} +- {t['acc_stderr']:.3f}" in row
    assert "Evaluations" in (comparison / "report.html").read_text()
    import mxfp8.interop.source as source

    loads = []
    original = source.open_model
    monkeypatch.setattr(source, "open_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    assert main(args) == 0  # scored already: not again, and no model is even loaded
    evals = json.loads((comparison / "bf16" / "eval.json").read_text())["evaluations"]
    assert len(evals) == 1 and loads == []
    other = tmp_path / "other.jsonl"
    other.write_text(task.read_text())
    assert main([*args[:-1], f"{args[-1]},{other}"]) == 0  # a new task: both runs again
    assert len(loads) == 2
    for recipe in ("bf16", "mxfp8-floor"):
        evals = json.loads((comparison / recipe / "eval.json").read_text())["evaluations"]
        assert len(evals) == 2 and set(evals[1]["tasks"]) == {"cloze", "mini", "other"}


def test_a_limited_or_few_shot_score_is_scored_again(comparison, tmp_path, monkeypatch):
    """compare --eval-tasks scores every item, zero-shot: an eval.json that holds a task only
    with --limit 5, or 5-shot, holds no score of compare's, so the run is scored again; once
    it holds compare's scores (from any entries), it is not."""
    import shutil

    import mxfp8.interop.source as source
    from mxfp8.compare import evaluate_run

    run = tmp_path / "bf16"
    shutil.copytree(comparison / "bf16", run)
    (run / "eval.json").unlink(missing_ok=True)  # what another test scored: not this one's
    items = [{"context": "the scale of the", "choices": ["block", "zebra"], "label": 0}] * 3
    dev = [{"context": "loss step", "choices": ["layer", "quartz"], "label": 0,
            "split": "dev"}] * 5  # fmt: skip
    task = tmp_path / "mini.jsonl"
    task.write_text("".join(json.dumps(i) + "\n" for i in items + dev))
    assert main(["eval", str(run), "--tasks", "cloze", "--limit", "5", "--no-lm"]) == 0
    assert main(["eval", str(run), "--tasks", str(task), "--num-fewshot", "5", "--no-lm"]) == 0

    def evals():
        return json.loads((run / "eval.json").read_text())["evaluations"]

    assert [e["tasks"]["cloze"]["items"] for e in evals()[:1]] == [5]
    assert evals()[1]["tasks"]["mini"]["num_fewshot"] == 5
    loads = []
    original = source.open_model
    monkeypatch.setattr(source, "open_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    evaluate_run(run, "cloze")  # only a --limit 5 cloze score: scored again
    assert len(loads) == 1 and len(evals()) == 3
    full = evals()[2]["tasks"]["cloze"]
    assert full["items"] > 200 and full["num_fewshot"] == 0
    evaluate_run(run, str(task))  # only a 5-shot score: scored again, zero-shot
    assert len(loads) == 2 and evals()[3]["tasks"]["mini"]["num_fewshot"] == 0
    evaluate_run(run, f"cloze,{task}")  # both held now, in two entries: nothing to do
    assert len(loads) == 2 and len(evals()) == 4


def test_recipe_sets_expand_in_order_without_repeats():
    from mxfp8.cli.compare import expand_recipes
    from mxfp8.compare import RECIPE_SETS
    from mxfp8.layers.recipe import list_recipes

    assert expand_recipes("default") == ["bf16", "mxfp8"]
    assert expand_recipes("ablations,mxfp8-attn,mxfp8") == [*RECIPE_SETS["ablations"],
                                                             "mxfp8-attn"]  # fmt: skip
    assert expand_recipes("all") == list_recipes()
    assert set(RECIPE_SETS["coverage"]) <= set(list_recipes())
    assert expand_recipes("mxfp9") == ["mxfp9"]  # left for the caller's unknown-recipe error


# --- multi-seed comparisons (--seeds) ---

SEEDED = ("--recipes", "bf16,mxfp8-floor", "--seeds", "0,1")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, cache):
    """``--seeds 0,1``, stopped by SIGTERM at step 2 of its second run (mxfp8-floor, seed 0),
    then run again to the end: what each invocation said, and the layout in between."""
    import contextlib
    import io
    import os
    import signal
    from types import SimpleNamespace

    import mxfp8.train.loop as loop
    from mxfp8.train.hooks import TrainHook

    out = tmp_path_factory.mktemp("seeds")
    calls = []

    class Preempt(TrainHook):
        def on_step_start(self, step):
            if len(calls) == 2 and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    original = loop.train

    def train(cfg):
        calls.append(cfg.run.out)
        return original(cfg, hooks=[Preempt()])

    args = _args(out, cache, *SEEDED)
    with torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train", train)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            first = main(args)
    between = sorted(str(p.relative_to(out)) for p in out.rglob("summary.json"))
    ckpts = sorted(str(p.relative_to(out)) for p in out.glob("*/seed*/checkpoints/step_*"))
    with torch_threads(1), contextlib.redirect_stderr(io.StringIO()) as err2:
        second = main(args)
    return SimpleNamespace(out=out, args=args, first=first, err=err.getvalue(), second=second,
                           err2=err2.getvalue(), between=between, ckpts=ckpts)  # fmt: skip


def test_seeds_run_every_recipe_under_every_seed_and_resume(seeded, comparison):
    out = seeded.out
    assert seeded.first == 143 and "stopped early by SIGTERM: mxfp8-floor/seed0" in seeded.err
    assert seeded.between == ["bf16/seed0/summary.json"]  # seed 1 had not started
    assert seeded.ckpts == ["bf16/seed0/checkpoints/step_0000008",
                            "mxfp8-floor/seed0/checkpoints/step_0000002"]  # fmt: skip
    assert seeded.second == 0
    for line in ("[1/4] bf16/seed0: already complete", "[2/4] mxfp8-floor/seed0: resuming",
                 "[3/4] bf16/seed1: training", "[4/4] mxfp8-floor/seed1: training"):  # fmt: skip
        assert line in seeded.err2
    cfgs = {}
    for recipe in ("bf16", "mxfp8-floor"):
        assert not (out / recipe / "metrics.jsonl").exists()  # nothing at the single-seed place
        for k in (0, 1):
            summary = json.loads((out / recipe / f"seed{k}" / "summary.json").read_text())
            assert summary["recipe"] == recipe and summary["steps"] == 8
            cfg = load_config(out / recipe / f"seed{k}" / "config.toml").to_dict()
            assert cfg["run"]["seed"] == k and cfg["recipe"]["name"] == recipe
            for key in ("seed", "out", "resume"):  # resume: true for the resumed run
                cfg["run"].pop(key)
            cfg["recipe"].pop("name")
            cfgs[recipe, k] = cfg
        # seed 0 is the single-seed comparison's run (default seed 0), the interrupted one too
        assert _losses(out / recipe / "seed0") == _losses(comparison / recipe)
    assert all(c == cfgs["bf16", 0] for c in cfgs.values())  # only recipe, out and seed differ
    assert _losses(out / "bf16" / "seed0") != _losses(out / "bf16" / "seed1")


def test_seeded_comparison_json_holds_the_statistics(seeded):
    out = seeded.out
    index = json.loads((out / "comparison.json").read_text())
    assert index["recipes"] == ["bf16", "mxfp8-floor"] and index["seeds"] == [0, 1]
    stats = index["stats"]
    assert "Student's t-distribution with n - 1 degrees of freedom" in stats["interval"]

    def val(recipe, k):
        return json.loads((out / recipe / f"seed{k}" / "summary.json").read_text())[
            "final_val_loss"
        ]

    for recipe in ("bf16", "mxfp8-floor"):
        s = stats["recipes"][recipe]
        a, b = val(recipe, 0), val(recipe, 1)
        assert s["seeds"] == [0, 1] and s["val_loss"] == {"0": a, "1": b}
        assert s["val_loss_mean"] == pytest.approx((a + b) / 2)
        assert s["val_loss_std"] == pytest.approx(abs(a - b) / 2**0.5)  # ddof=1, two values
    assert stats["recipes"]["bf16"]["verdict"] == "baseline"
    floor = stats["recipes"]["mxfp8-floor"]
    g = [(val("mxfp8-floor", k) - val("bf16", k)) / val("bf16", k) * 100 for k in (0, 1)]
    assert floor["gap_pct"] == pytest.approx({"0": g[0], "1": g[1]})
    m, sd = (g[0] + g[1]) / 2, abs(g[0] - g[1]) / 2**0.5
    t = 12.706204736174698  # t_{0.975} with 1 degree of freedom: tan(0.475 pi)
    lo, hi = m - t * sd / 2**0.5, m + t * sd / 2**0.5
    assert floor["gap_mean_pct"] == pytest.approx(m) and floor["df"] == 1
    assert floor["t_quantile"] == pytest.approx(t)
    assert floor["gap_ci95_pct"] == pytest.approx([lo, hi])
    expected = "worse" if lo > 0 else "better" if hi < 0 else "indistinguishable from bf16"
    assert floor["verdict"] == expected


def test_a_finished_seeded_comparison_is_skipped(seeded, capsys):
    out = seeded.out
    report = out / "report.html"
    before = (out / "bf16" / "seed1" / "metrics.jsonl").read_bytes(), report.stat().st_mtime_ns
    assert main(seeded.args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("already complete") == 4
    after = (out / "bf16" / "seed1" / "metrics.jsonl").read_bytes(), report.stat().st_mtime_ns
    assert after == before  # nothing trained, the report was up to date
    floor = json.loads((out / "comparison.json").read_text())["stats"]["recipes"]["mxfp8-floor"]
    lo, hi = floor["gap_ci95_pct"]
    assert "mxfp8-floor/seed1" in captured.out and "over seeds 0, 1" in captured.out
    assert "Student's t, n-1 degrees of freedom" in captured.out
    assert f"[{lo:+.2f} %, {hi:+.2f} %]  {floor['verdict']}" in captured.out
    page = report.read_text()
    assert "95 % confidence interval (t)" in page and f"[{lo:+.3f}, {hi:+.3f}]" in page
    assert (out / "plots" / "gap.png").is_file() and "min to max over seeds" in page


def test_bad_seeds_and_mixed_layouts_are_refused(tmp_path, cache, comparison, seeded, capsys):
    for spec, why in (("a,1", "'a' not a non-negative integer"), ("0,0", "listed twice"),
                      ("", "no seed given"), ("1,,2", "'' not a non-negative integer"),
                      ("-1", "'-1' not a non-negative integer")):  # fmt: skip
        assert main(_args(tmp_path, cache, "--seeds", spec)) == 2
        assert why in capsys.readouterr().err
    assert main(_args(tmp_path, cache, "--seeds", "0,1", "--seed", "3")) == 2
    assert "not both" in capsys.readouterr().err
    assert main(_args(comparison, cache, "--recipes", "bf16", "--seeds", "0")) == 2
    assert "holds a single-seed run" in capsys.readouterr().err
    assert main(_args(seeded.out, cache, "--recipes", "bf16")) == 2
    assert "multi-seed comparison" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_one_seed_uses_the_seed_layout_and_seeds_go_seed_after_seed(tmp_path):
    from mxfp8.compare import plan

    base = load_config(None, {"run.seed": 5})
    plans = plan(base, ["bf16", "mxfp8"], tmp_path, seeds=[3])
    assert [(p.label, p.cfg.run.seed) for p in plans] == [("bf16/seed3", 3), ("mxfp8/seed3", 3)]
    assert [p.run_dir for p in plans] == [tmp_path / "bf16" / "seed3", tmp_path / "mxfp8" / "seed3"]
    plans = plan(base, ["bf16", "mxfp8"], tmp_path, seeds=[2, 0])
    assert [p.label for p in plans] == ["bf16/seed2", "mxfp8/seed2", "bf16/seed0", "mxfp8/seed0"]
    plans = plan(base, ["bf16"], tmp_path)  # no seeds: the single-seed layout, run.seed kept
    assert [(p.label, p.run_dir, p.cfg.run.seed) for p in plans] == [("bf16", tmp_path / "bf16", 5)]
