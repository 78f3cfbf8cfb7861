"""scripts/full_split_gaps.py: paired gaps from the whole-split losses of ``mxfp8 eval``, and
only those: the final checkpoint, the run's recipe, its split, its windows, every token."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mxfp8.config.train_config import load_config
from mxfp8.data.prepare import DataConfig, prepare_data
from mxfp8.interop.source import checkpoint_source

SCRIPT = Path(__file__).parents[2] / "scripts" / "full_split_gaps.py"
STEPS, SEQ_LEN = 30, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(corpus path, cache dir, validation tokens): a small local corpus, prepared once."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = "the a of to and in that is was he for it with as his on be at by had".split()
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12))
                                               for _ in range(3000)))  # fmt: skip
    data = prepare_data(DataConfig(source=str(root / "corpus.txt"), vocab_size=300,
                                   cache_dir=str(root)))  # fmt: skip
    return root / "corpus.txt", root, len(data.val)


class Run:
    """A completed seed run CMP/<recipe>/seed<k>/ (config.toml and summary.json as training
    writes them; no weights: the script reads eval.json only) and its eval.json entries."""

    def __init__(self, cmp: Path, recipe: str, seed: int, corpus):
        source, cache, self.n_val = corpus
        self.dir, self.recipe = cmp / recipe / f"seed{seed}", recipe
        self.dir.mkdir(parents=True)
        cfg = load_config(None, {"recipe.name": recipe, "run.seed": seed, "run.steps": STEPS,
                                 "run.seq_len": SEQ_LEN, "data.source": str(source),
                                 "data.vocab_size": 300, "data.cache_dir": str(cache)})  # fmt: skip
        cfg.save(self.dir / "config.toml")
        summary = {"recipe": recipe, "steps": STEPS, "final_val_loss": 5.0}
        (self.dir / "summary.json").write_text(json.dumps(summary))
        self.data = f"{source} (the run's validation split)"  # as mxfp8 eval describes it
        self.entries: list[dict] = [{"source": "s", "tasks": {"cloze": {}}}]  # no loss: skipped

    def source(self, step=STEPS):
        return checkpoint_source(self.dir / "checkpoints" / f"step_{step:07d}", step)

    def whole(self):
        """The tokens of mxfp8 eval without --max-tokens: every whole window of 32 inputs."""
        return (self.n_val - 1) // SEQ_LEN * SEQ_LEN

    def add(self, loss, **changes):
        entry = {"source": self.source(), "recipe": self.recipe, "data": self.data,
                 "loss": loss, "tokens": self.whole(), "seq_len": SEQ_LEN, **changes}  # fmt: skip
        self.entries.append(entry)
        (self.dir / "eval.json").write_text(json.dumps({"evaluations": self.entries}))

    def add_distractors(self):
        """Newer entries of the same run that are not its whole-split loss (a wrong loss each)."""
        self.add(9.0, tokens=1000 // SEQ_LEN * SEQ_LEN)  # mxfp8 eval --max-tokens 1000
        self.add(9.1, recipe="mxfp8" if self.recipe == "bf16" else "bf16")  # --recipe
        self.add(9.2, source=self.source(20))  # --step 20
        self.add(9.3, data="kjv (validation split)")  # --data kjv
        self.add(9.4, seq_len=16, tokens=(self.n_val - 1) // 16 * 16)  # --seq-len 16
        self.add(9.5, data="the run's validation batches")  # its own batches, not the split
        self.add(9.6, recipe_is_the_runs=False)  # --recipe of the same name: not its resolved one


@pytest.fixture
def script(monkeypatch, capsys):
    """Run the script on a comparison directory, in this process (no second torch import):
    its exit status, stdout and stderr."""
    spec = importlib.util.spec_from_file_location("full_split_gaps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(cmp):
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(cmp)])
        try:
            module.main()
            code = 0
        except SystemExit as exc:
            print(exc.code, file=sys.stderr)
            code = 1
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def test_the_counted_token_number_is_the_whole_split(corpus):
    _, _, n_val = corpus
    assert n_val > 1000 + SEQ_LEN  # so that --max-tokens 1000 is a part of it
    assert (n_val - 1) // SEQ_LEN * SEQ_LEN > 1000


def test_gaps_are_paired_seed_by_seed_with_a_t_interval(tmp_path, corpus, script, monkeypatch):
    bf16 = {0: 4.0, 1: 4.5, 2: 3.5}  # the seeds differ far more than the gaps do
    for k, v in bf16.items():
        for recipe, loss in (("bf16", v), ("mxfp8", v * (1 + (k + 1) / 100))):  # +1, +2, +3 %
            run = Run(tmp_path / "cmp", recipe, k, corpus)
            run.add(loss)
            run.add_distractors()  # newer, but none of them is the whole-split loss
    monkeypatch.chdir(tmp_path)
    r = script("cmp")  # a relative spelling of the (absolute) paths the entries name
    assert r.returncode == 0, r.stderr
    line = next(row for row in r.stdout.splitlines() if row.startswith("mxfp8 "))
    # mean 2, std 1, t(0.975, 2 df) = 4.303: 2 +- 4.303 / sqrt(3) = [-0.48, +4.48]
    assert "+2.00 %" in line and "[-0.48 %, +4.48 %]" in line
    assert "indistinguishable from bf16" in line and "0: +1.00, 1: +2.00, 2: +3.00" in line
    assert "4.0000 +- 0.5000" in next(x for x in r.stdout.splitlines() if x.startswith("bf16 "))
    assert "missing" not in r.stdout


def test_a_run_without_a_whole_split_entry_is_missing_not_replaced(tmp_path, corpus, script):
    for k, v in {0: 4.0, 1: 4.5, 2: 3.5}.items():
        Run(tmp_path, "bf16", k, corpus).add(v)
        run = Run(tmp_path, "mxfp8", k, corpus)
        if k == 2:  # only part of the split, and the other recipe's score: neither counts
            run.add(3.0, tokens=1000 // SEQ_LEN * SEQ_LEN)
            run.add(3.1, recipe="bf16")
        else:
            run.add(v * 1.01)
    r = script(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "missing, left out of the statistics:\n  mxfp8/seed2: no whole-split loss" in r.stdout
    line = next(row for row in r.stdout.splitlines() if row.startswith("mxfp8 "))
    assert line.split()[1] == "2" and "0: +1.00, 1: +1.00" in line and "2:" not in line


def test_no_bf16_run_is_an_error(tmp_path, corpus, script):
    Run(tmp_path, "mxfp8", 0, corpus).add(4.0)
    run = Run(tmp_path, "bf16", 0, corpus)
    run.add(4.0, tokens=1000 // SEQ_LEN * SEQ_LEN)  # a bf16 entry, but of part of the split
    r = script(tmp_path)
    assert r.returncode != 0 and "no bf16 run scored on its whole split" in r.stderr
    assert "bf16/seed0: no whole-split loss" in r.stdout
