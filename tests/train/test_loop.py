"""The training loop on a tiny model: each recipe learns, resume is exact, skips are counted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mxfp8 import checkpoint as ckpt
from mxfp8.checkpoint.resume import ResumeError
from mxfp8.config.train_config import load_config
from mxfp8.layers.recipe import list_recipes
from mxfp8.train import golden
from mxfp8.train.loop import TrainHook, train
from mxfp8.train.runlog import TIMING_KEYS, read_metrics


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here compares training numbers: one torch thread (tests/conftest.py)."""


def small_cfg(out, cache, recipe="bf16", **over):
    base = {**golden.OVERRIDES, "data.cache_dir": str(cache), "recipe.name": recipe}
    return load_config(None, {**base, "run.out": str(out), **over})


def exact(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


@pytest.mark.parametrize("recipe", list_recipes())
def test_each_recipe_decreases_the_loss(recipe, tmp_path, data_cache):
    result = train(small_cfg(tmp_path, data_cache, recipe, **{"run.steps": 15}))
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert result.completed and result.skipped_steps == 0
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"] == recipe and summary["steps"] == 15
    assert summary["final_val_loss"] == pytest.approx(result.final_val_loss)
    assert not summary["diverged"]


@pytest.mark.parametrize("recipe", ["bf16", "mxfp8", "fp8-delayed"])
def test_resume_is_bit_identical(recipe, tmp_path, data_cache):
    over = {"run.steps": 12, "run.eval_every": 4, "run.log_every": 1}
    full = train(small_cfg(tmp_path / "full", data_cache, recipe, **over))
    part = train(small_cfg(tmp_path / "part", data_cache, recipe, **over, **{"run.stop_after": 5}))
    assert not part.completed and part.step == 5
    assert not (tmp_path / "part" / "summary.json").exists()
    assert ckpt.latest_checkpoint(tmp_path / "part").name == "step_0000005"
    resumed = train(
        small_cfg(tmp_path / "part", data_cache, recipe, **over, **{"run.resume": True})
    )
    assert resumed.completed
    assert exact(read_metrics(tmp_path / "part")) == exact(read_metrics(tmp_path / "full"))
    assert resumed.final_val_loss == full.final_val_loss
    a = torch.load(tmp_path / "full/checkpoints/step_0000012/state.pt", weights_only=True)
    b = torch.load(tmp_path / "part/checkpoints/step_0000012/state.pt", weights_only=True)
    states = zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True)
    for p, q in states:
        assert all(torch.equal(p[k], q[k]) for k in ("exp_avg", "exp_avg_sq"))
    if recipe == "fp8-delayed":
        assert b["scaling"], "delayed-scaling amax histories must be checkpointed"


def test_resume_with_accumulation_and_periodic_checkpoints(tmp_path, data_cache):
    over = {"run.steps": 6, "run.grad_accum": 2, "run.ckpt_every": 2, "run.keep_last": 2}
    full = train(small_cfg(tmp_path / "full", data_cache, "mxfp8", **over))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "full")] == [
        "step_0000004",
        "step_0000006",
    ]
    train(small_cfg(tmp_path / "part", data_cache, "mxfp8", **over, **{"run.stop_after": 3}))
    train(small_cfg(tmp_path / "part", data_cache, "mxfp8", **over, **{"run.resume": True}))
    assert exact(read_metrics(tmp_path / "part")) == exact(read_metrics(tmp_path / "full"))
    assert read_metrics(tmp_path / "full")[-1]["tokens"] == 6 * 2 * 4 * 32
    assert full.completed


class PoisonStep(TrainHook):
    """Makes the loss of one step NaN (through a forward hook on the LM head)."""

    def __init__(self, step):
        self.step, self.active, self.seen = step, False, []

    def on_train_start(self, ctx):
        def poison(module, args, out):
            return out * float("nan") if self.active else out

        ctx.model.output.register_forward_hook(poison)
        self.ctx = ctx

    def on_step_start(self, step):
        self.active = step == self.step
        self.before = [p.detach().clone() for p in self.ctx.model.parameters()]

    def on_step_end(self, step, metrics):
        self.seen.append(step)
        if step == self.step:
            after = list(self.ctx.model.parameters())
            self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, after, strict=True))


@pytest.mark.parametrize("mode", ["on", "off"])
def test_nonfinite_step_is_skipped_and_scale_backs_off(mode, tmp_path, data_cache):
    hook = PoisonStep(3)
    over = {"run.steps": 5, "loss_scale.enabled": mode, "loss_scale.init_scale": 1024.0}
    result = train(small_cfg(tmp_path, data_cache, "bf16", **over), hooks=[hook])
    m = read_metrics(tmp_path)
    assert hook.seen == [1, 2, 3, 4, 5] and hook.unchanged
    assert [x["skipped_steps"] for x in m] == [0, 0, 1, 1, 1] and result.skipped_steps == 1
    scales = [x["loss_scale"] for x in m]
    assert scales == ([1024.0, 1024.0, 1024.0, 512.0, 512.0] if mode == "on" else [1.0] * 5)


def test_loss_scaling_is_automatic_for_per_tensor_recipes(tmp_path, data_cache):
    train(small_cfg(tmp_path, data_cache, "fp8-tensorwise", **{"run.steps": 2}))
    assert read_metrics(tmp_path)[0]["loss_scale"] == 2.0**16


def test_metrics_keys_and_existing_run_dir(tmp_path, data_cache):
    cfg = small_cfg(tmp_path, data_cache, "bf16", **{"run.steps": 4, "run.log_every": 2})
    train(cfg)
    m = read_metrics(tmp_path)
    keys = {"step", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "tokens"}
    assert [x["step"] for x in m] == [2, 4] and keys | set(TIMING_KEYS) <= set(m[0])
    assert {"val_loss", "val_ppl"} <= set(m[-1])
    assert load_config(tmp_path / "config.toml").run.steps == 4
    with pytest.raises(ResumeError, match="already holds a run"):
        train(cfg)


def test_every_run_gets_the_stats_hooks_with_its_config(tmp_path):
    from mxfp8.stats.divergence import DivergenceHook
    from mxfp8.stats.telemetry import TelemetryHook
    from mxfp8.train.loop import _auto_hooks

    cfg = load_config(None, {"divergence.sigmas": "2.5"})
    (hook,) = _auto_hooks(cfg, tmp_path)
    assert isinstance(hook, DivergenceHook) and hook.detector.config.sigmas == 2.5
    cfg = load_config(None, {"run.telemetry_every": "3"})
    telemetry, divergence = _auto_hooks(cfg, tmp_path)  # telemetry first: events can use it
    assert isinstance(telemetry, TelemetryHook) and telemetry.every == 3
    assert isinstance(divergence, DivergenceHook)


def test_resume_with_another_seed_is_refused(tmp_path, data_cache):
    """Batches are f(seed, step): continuing a run under another seed would change its data."""
    over = {"run.steps": 4, "run.stop_after": 2}
    train(small_cfg(tmp_path, data_cache, **over))
    with pytest.raises(ResumeError, match="run.seed: 1234 -> 7"):
        train(
            small_cfg(tmp_path, data_cache, **{"run.steps": 4, "run.resume": True, "run.seed": 7})
        )


def test_summary_of_a_diverged_run_is_strict_json_and_reads_back(tmp_path):
    from mxfp8.report.loader import load_run
    from mxfp8.train.loop import write_summary

    write_summary(tmp_path, {"recipe": "mxfp8", "final_val_loss": float("nan"), "steps": 3})
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["nonfinite_values"] == {"final_val_loss": "nan"}
    assert math.isnan(load_run(tmp_path).summary["final_val_loss"])
