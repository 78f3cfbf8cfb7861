"""Non-finite steps without loss scaling: skipped, counted, logged, flagged; K in a row stop
the run naming the step and the first module whose output was non-finite."""

from __future__ import annotations

import math

import pytest
import torch
from train_faults import InjectNaN

from mxfp8.config.train_config import load_config
from mxfp8.stats.jsonl import read_rows
from mxfp8.train import golden
from mxfp8.train.loop import NonFiniteError, train
from mxfp8.train.runlog import read_metrics


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def cfg(out, cache, recipe="mxfp8", **over):
    base = {**golden.OVERRIDES, "data.cache_dir": str(cache), "recipe.name": recipe}
    return load_config(None, {**base, "run.out": str(out), "run.steps": 8, **over})


@pytest.mark.parametrize("recipe", ["bf16", "mxfp8"])
def test_a_nan_step_is_skipped_counted_logged_and_flagged(recipe, tmp_path, data_cache, capsys):
    result = train(cfg(tmp_path / "run", data_cache, recipe, **{"run.log_every": 4,
                                                                 "run.progress": True}),
                   hooks=[InjectNaN("layers.1.attention", {3})])  # fmt: skip
    assert result.completed and result.skipped_steps == 1
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert 3 in rows, "a skipped step is logged even between log_every steps"
    assert math.isnan(rows[3]["loss"]) and rows[3]["nonfinite"] == "loss"
    assert rows[3]["skipped_steps"] == 1 and rows[3]["nonfinite_module"].startswith(
        "layers.1.attention"
    )
    assert rows[4]["skipped_steps"] == 1 and math.isfinite(rows[4]["loss"])
    assert math.isfinite(result.final_val_loss)  # the NaN update never reached the weights
    events = [e for e in read_rows(tmp_path / "run/events.jsonl") if e["step"] == 3]
    assert any(e["kind"] in ("nan", "skip") for e in events), events
    assert "step 3: non-finite loss, update skipped" in capsys.readouterr().err


def test_a_nonfinite_gradient_with_a_finite_loss_is_skipped_and_flagged(tmp_path, data_cache):
    result = train(cfg(tmp_path / "run", data_cache, "bf16"),
                   hooks=[InjectNaN("layers.0.feed_forward", {2}, where="backward")])  # fmt: skip
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert math.isfinite(rows[2]["loss"]) and rows[2]["nonfinite"] == "gradients"
    assert rows[2]["nonfinite_module"] is None  # the forward was finite
    assert result.skipped_steps == 1 and result.completed
    kinds = [(e["step"], e["kind"]) for e in read_rows(tmp_path / "run/events.jsonl")]
    assert (2, "skip") in kinds


def test_k_nonfinite_steps_in_a_row_stop_the_run(tmp_path, data_cache):
    hooks = [InjectNaN("layers.0.feed_forward", {3, 4, 5, 6})]
    over = {"run.max_nonfinite_steps": 3}
    with pytest.raises(NonFiniteError) as e:
        train(cfg(tmp_path / "run", data_cache, "mxfp8", **over), hooks=hooks)
    text = str(e.value)
    assert "stopping at step 5: 3 consecutive steps" in text
    assert "first non-finite forward output: layers.0.feed_forward" in text
    assert not (tmp_path / "run/summary.json").exists()


def test_the_stop_is_a_clear_cli_error(tmp_path, data_cache, capsys, monkeypatch):
    from mxfp8.cli import train as cli_train

    real = cli_train.run_config.__globals__
    del real  # the CLI path is run_config -> train; inject through a wrapper of train
    import mxfp8.train.loop as loop

    original = loop.train
    monkeypatch.setattr(
        loop, "train", lambda c: original(c, hooks=[InjectNaN("layers.0.feed_forward", {1, 2})])
    )
    code = cli_train.run_config(cfg(tmp_path / "run", data_cache, "bf16",
                                    **{"run.max_nonfinite_steps": 2}))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "error: stopping at step 2" in err and "Traceback" not in err


def test_routine_loss_scaling_overflows_are_not_flagged(tmp_path, data_cache):
    over = {"loss_scale.enabled": "on", "loss_scale.init_scale": 2.0**126}
    result = train(cfg(tmp_path / "run", data_cache, "bf16", **over))
    rows = read_metrics(tmp_path / "run")
    assert result.skipped_steps > 0  # the huge scale overflowed and backed off
    assert not any("nonfinite" in r for r in rows)
    assert torch.isfinite(torch.tensor(result.final_val_loss))
