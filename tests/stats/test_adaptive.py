"""mxfp8-adaptive: a layer whose operands cross a threshold, or that a divergence event names
first, runs in bf16 for the rest of the run; decisions are logged, checkpointed and resumed."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from mxfp8.cli.main import main
from mxfp8.config.train_config import load_config
from mxfp8.layers.convert import convert_model
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.precision import load_precision_state_dict, precision_state_dict
from mxfp8.layers.recipe import Recipe, recipe
from mxfp8.model import llama
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer
from mxfp8.stats.adaptive import AdaptiveHook, crossings
from mxfp8.train import golden
from mxfp8.train.hooks import TrainHook
from mxfp8.train.loop import train
from mxfp8.train.runlog import TIMING_KEYS, read_metrics

TARGET = "layers.1.feed_forward.w2"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-identical comparisons of training runs: one torch thread (tests/conftest.py)."""


def _row(layer, **kw):
    base = {"layer": layer, "gemm": "fprop", "operand": "weight", "saturated_pct": 0.0,
            "underflow_pct": 0.01, "sqnr_db": 31.0}  # fmt: skip
    return {**base, **kw}


def test_crossings_name_the_first_threshold_crossed():
    r = recipe("mxfp8-adaptive")
    rows = [_row("a"), _row("b", saturated_pct=0.9), _row("c", underflow_pct=12.0),
            _row("d", sqnr_db=15.0), _row("b", sqnr_db=1.0)]  # fmt: skip
    got = crossings(rows, r)
    assert set(got) == {"b", "c", "d"}
    assert "saturated 0.9 % > 0.5" in got["b"] and "underflow 12 % > 5.0" in got["c"]
    assert "SQNR 15 dB < 20.0" in got["d"]
    assert crossings([_row("a", sqnr_db=25.0)], r.replace(adaptive_min_sqnr_db=30.0))


def test_the_weight_gradients_output_gradient_may_underflow_by_default():
    """What a healthy mxfp8 run shows (docs/recipes.md, 5 seeds): up to 39 % of the wgrad
    grad_output flushed at 30.3 dB SQNR, every other operand under 0.3 %. That is no reason to
    switch; the same share on an activation is (a run destabilized by a high lr: 30-40 %)."""
    r = recipe("mxfp8-adaptive")
    assert r.adaptive_underflow_ignore == ("wgrad/grad_output",)
    healthy = [_row("a", gemm="wgrad", operand="grad_output", underflow_pct=38.9, sqnr_db=30.3),
               _row("b", gemm="dgrad", operand="grad_output", underflow_pct=0.21)]  # fmt: skip
    assert crossings(healthy, r) == {}
    unstable = [_row("c", gemm="fprop", operand="input", underflow_pct=30.5, sqnr_db=30.0)]
    assert crossings(unstable, r) == {"c": "fprop/input underflow 30.5 % > 5.0"}
    checks_all = r.replace(adaptive_underflow_ignore=())
    assert set(crossings(healthy, checks_all)) == {"a"}
    back = Recipe.from_toml(r.replace(adaptive_underflow_ignore=["fprop/input"]).to_toml())
    assert back.adaptive_underflow_ignore == ("fprop/input",)
    for bad in ("wgrad/grad_output", ["wgrad"], ["a/b/c"], [3]):
        with pytest.raises(ValueError, match="adaptive_underflow_ignore"):
            recipe("mxfp8-adaptive", adaptive_underflow_ignore=bad)


class _Outlier(TrainHook):
    """Makes TARGET an outlier layer in the first two steps: before each, in every block of
    32 along K one weight keeps its size and the others shrink by 1e-8, far below the block
    scale's E4M3 range, so they flush to zero (underflow) when quantized. (Once is not
    enough: AdamW's first update is ~lr whatever the weight.) The same steps in a fresh and
    a resumed run, so the two stay comparable."""

    def on_train_start(self, ctx):
        self.weight = ctx.model.get_submodule(TARGET).weight

    def on_step_start(self, step):
        if step <= 2:
            with torch.no_grad():
                keep = torch.arange(self.weight.shape[1]) % 32 == 0
                self.weight[:, ~keep] *= 1e-8


def _cfg(tmp_path, cache, name="mxfp8-adaptive", **over):
    base = {**golden.OVERRIDES, "data.cache_dir": str(cache), "recipe.name": name,
            "run.out": str(tmp_path), "run.steps": 6, "run.telemetry_every": 2,
            "run.log_every": 1, "run.eval_every": 3}  # fmt: skip
    return load_config(None, {**base, **over})


def _exact(rows):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in rows]


def test_an_outlier_layer_is_switched_logged_checkpointed_and_resumed(tmp_path, data_cache):
    full = train(_cfg(tmp_path / "full", data_cache), hooks=[_Outlier()])
    assert full.completed
    events = [json.loads(ln) for ln in (tmp_path / "full/events.jsonl").read_text().splitlines()]
    switches = [e for e in events if e["kind"] == "precision"]
    assert len(switches) == 1 and switches[0]["step"] == 2
    by_name = {x["layer"]: x for x in switches[0]["layers"]}
    # the outlier weight underflows; the gradients it hands back to w1 and w3 (its input)
    # are as lopsided, so they go too; nothing else does
    assert set(by_name) == {TARGET, "layers.1.feed_forward.w1", "layers.1.feed_forward.w3"}
    assert by_name[TARGET]["reason"].startswith("fprop/weight underflow")
    assert "dgrad/grad_output underflow" in by_name["layers.1.feed_forward.w1"]["reason"]
    assert by_name[TARGET]["from"] == "mxfp8-adaptive"
    summary = json.loads((tmp_path / "full/summary.json").read_text())
    assert summary["layer_recipes"][TARGET] == "high precision"
    assert summary["layer_recipes"]["layers.0.feed_forward.w1"] == "mxfp8-adaptive"
    assert summary["layer_recipes"]["layers.1.attention.wq"] == "mxfp8-adaptive"
    assert set(summary["precision_switches"]) == set(by_name)
    assert summary["divergence_events"] == 0  # a switch is not a divergence event
    # telemetry after the switch no longer measures the layer
    rows = [json.loads(ln) for ln in (tmp_path / "full/numerics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if r["layer"] == TARGET} == {2}
    state = torch.load(tmp_path / "full/checkpoints/step_0000006/state.pt", weights_only=True)
    assert set(state["precision"]) == set(by_name)
    # evaluated later, the checkpoint runs its switched layers in bf16, as the run did: the
    # run's own validation batches give its logged val_loss exactly
    assert main(["eval", str(tmp_path / "full"), "--val-batches"]) == 0
    # the preset by its name (what eval rebuilt before): the switched layers in MX again
    assert (
        main(["eval", str(tmp_path / "full"), "--val-batches", "--recipe", "mxfp8-adaptive"]) == 0
    )
    ev, by_preset = json.loads((tmp_path / "full/eval.json").read_text())["evaluations"]
    logged = [m["val_loss"] for m in read_metrics(tmp_path / "full") if m["step"] == 6]
    assert ev["loss"] == logged[0] and ev["precision_switches"] == sorted(by_name)
    assert by_preset["loss"] != logged[0] and by_preset["precision_switches"] == []
    # an MXFP8 export stores the switched layers in high precision, the others as FP8
    assert main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "exp"),
                 "--format", "mxfp8"]) == 0  # fmt: skip
    from safetensors import safe_open

    with safe_open(tmp_path / "exp" / "model.safetensors", "pt") as f:
        fp8 = {
            k.removesuffix(".weight") for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"
        }
    assert {llama.hf_name(f"{n}.weight").removesuffix(".weight") for n in by_name} & fp8 == set()
    assert llama.hf_name("layers.0.feed_forward.w1.weight").removesuffix(".weight") in fp8
    # stopped at step 3 (after the switch), resumed: bit-identical to the uninterrupted run
    part = tmp_path / "part"
    train(_cfg(part, data_cache, **{"run.stop_after": 3}), hooks=[_Outlier()])
    resumed = train(_cfg(part, data_cache, **{"run.resume": True}), hooks=[_Outlier()])
    assert resumed.completed
    assert _exact(read_metrics(part)) == _exact(read_metrics(tmp_path / "full"))
    again = [json.loads(ln) for ln in (part / "events.jsonl").read_text().splitlines()]
    assert again == events


def test_healthy_numerics_cost_nothing(tmp_path, data_cache):
    """No threshold is crossed on a normal run: mxfp8-adaptive is the mxfp8 run, bit for bit."""
    a = train(_cfg(tmp_path / "a", data_cache))
    b = train(_cfg(tmp_path / "b", data_cache, "mxfp8"))
    assert _exact(read_metrics(tmp_path / "a")) == _exact(read_metrics(tmp_path / "b"))
    assert a.final_val_loss == b.final_val_loss
    assert json.loads((tmp_path / "a/summary.json").read_text())["precision_switches"] == {}


def _toy():
    return Transformer(model_config("tiny", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                    ffn_hidden=128, vocab_size=100, max_seq_len=32))  # fmt: skip


def test_the_layer_a_divergence_event_names_first_is_switched():
    model = convert_model(_toy(), recipe("mxfp8-adaptive"))
    event = SimpleNamespace(
        kind="spike",
        step=7,
        layers=[{"layer": "layers.0.attention.wk"}, {"layer": "layers.1.attention.wq"}],
    )
    tel = SimpleNamespace(latest=[])
    div = SimpleNamespace(events=[])
    hook = AdaptiveHook(recipe("mxfp8-adaptive"), None, tel, div)
    hook.on_train_start(SimpleNamespace(model=model))
    div.events.append(event)
    metrics = {"loss": 3.0}
    hook.on_step_end(7, metrics)
    assert metrics["precision_switches"] == 1
    assert not model.get_submodule("layers.0.attention.wk").recipe.quantized
    assert model.get_submodule("layers.1.attention.wq").recipe.quantized  # only the first
    state = precision_state_dict(model)
    assert state == {"layers.0.attention.wk": {"step": 7, "from": "mxfp8-adaptive",
                     "reason": "divergence event (spike) at step 7 named it first"}}  # fmt: skip
    fresh = convert_model(_toy(), recipe("mxfp8-adaptive"))
    load_precision_state_dict(fresh, state)
    layer = fresh.get_submodule("layers.0.attention.wk")
    assert isinstance(layer, MXLinear) and not layer.recipe.quantized
    with pytest.raises(KeyError, match="lacks"):
        load_precision_state_dict(fresh, {"layers.9.x": state["layers.0.attention.wk"]})
    # with adaptive_on_divergence off, the same event switches nothing
    off = AdaptiveHook(recipe("mxfp8-adaptive", adaptive_on_divergence=False), None, tel,
                       SimpleNamespace(events=[]))  # fmt: skip
    other = convert_model(_toy(), recipe("mxfp8-adaptive"))
    off.on_train_start(SimpleNamespace(model=other))
    off.divergence.events.append(event)
    off.on_step_end(7, {})
    assert other.get_submodule("layers.0.attention.wk").recipe.quantized


def _events(run_dir):
    """events.jsonl parsed as strict JSON (a NaN or Infinity token is refused, as jq, a
    browser or pandas would refuse it)."""

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    text = (run_dir / "events.jsonl").read_text()
    return [json.loads(ln, parse_constant=refuse) for ln in text.splitlines()]


class _NanAt(TrainHook):
    """A real non-finite loss at step ``step``: one weight of the first block's wq is NaN
    during that step's forward and backward, and restored after it (the loop skipped the
    update, so the run then continues as if the step had not happened, save the schedule)."""

    def __init__(self, step):
        self.step = step

    def on_train_start(self, ctx):
        self.weight = ctx.model.get_submodule("layers.0.attention.wq").weight

    def on_step_start(self, step):
        if step == self.step:
            self.saved = self.weight.detach().clone()
            with torch.no_grad():
                self.weight[0, 0] = float("nan")

    def on_step_end(self, step, metrics):
        if step == self.step:
            with torch.no_grad():
                self.weight.copy_(self.saved)


def test_a_nan_loss_switches_the_named_layer_and_is_written_as_strict_json(tmp_path,
                                                                          data_cache):  # fmt: skip
    """Adaptive precision on the case it exists for: after a telemetry step, a NaN loss raises
    a divergence event naming a layer, which is switched; the switch's event (loss NaN) is
    written as null plus a flag, and a resumed run passes the same step bit-identically."""
    cfg = lambda out, **kw: _cfg(out, data_cache, **{"run.max_nonfinite_steps": 0, **kw})  # noqa: E731
    full = train(cfg(tmp_path / "full"), hooks=[_NanAt(3)])
    assert full.completed
    events = _events(tmp_path / "full")
    kinds = [(e["step"], e["kind"]) for e in events]
    assert kinds == [(3, "nan"), (3, "skip"), (3, "precision")], kinds
    switch = events[-1]
    assert switch["loss"] is None and switch["nonfinite_values"] == {"loss": "nan"}
    named = events[0]["layers"][0]["layer"]
    assert [x["layer"] for x in switch["layers"]] == [named]
    assert "divergence event (nan) at step 3" in switch["layers"][0]["reason"]
    # the NaN step's metrics row is strict JSON too, and reads back as NaN
    rows = [json.loads(ln) for ln in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    nan_row = next(r for r in rows if r["step"] == 3)
    assert nan_row["loss"] is None and nan_row["nonfinite_values"]["loss"] == "nan"
    assert math.isnan(next(m for m in read_metrics(tmp_path / "full") if m["step"] == 3)["loss"])
    # stopped before the NaN, resumed through it: the same events and metrics
    part = tmp_path / "part"
    train(cfg(part, **{"run.stop_after": 2}), hooks=[_NanAt(3)])
    resumed = train(cfg(part, **{"run.resume": True}), hooks=[_NanAt(3)])
    assert resumed.completed
    assert _events(part) == events
    assert _exact(read_metrics(part)) == _exact(read_metrics(tmp_path / "full"))


class _SpikeAt(TrainHook):
    """Multiplies the logged loss of step ``step`` by 3 before the detectors see it: a spike
    the detector must flag (the run's numbers are otherwise untouched)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, metrics):
        if step == self.step:
            metrics["loss"] *= 3


def test_a_spike_after_a_resume_is_flagged_as_in_the_uninterrupted_run(tmp_path, data_cache):
    """With the default log_every (5) and the default divergence warm-up (20 steps), a spike
    at step 33 of a run resumed at step 30: the detector's state comes from the checkpoint, so
    the event, and the layer the adaptive recipe switches for it, are the uninterrupted run's.
    (Rebuilt from the 6 logged losses, the baseline would still be in its warm-up.)"""
    over = {"run.steps": 36, "run.log_every": 5, "run.telemetry_every": 10,
            "run.eval_every": 0}  # fmt: skip
    assert load_config(None, {}).run.log_every == 5  # the default this test is about
    full = train(_cfg(tmp_path / "full", data_cache, **over), hooks=[_SpikeAt(33)])
    events = _events(tmp_path / "full")
    assert [(e["step"], e["kind"]) for e in events] == [(33, "spike"), (33, "precision")]
    part = tmp_path / "part"
    train(_cfg(part, data_cache, **over, **{"run.stop_after": 30}), hooks=[_SpikeAt(33)])
    resumed = train(_cfg(part, data_cache, **over, **{"run.resume": True}),
                    hooks=[_SpikeAt(33)])  # fmt: skip
    assert _events(part) == events
    assert _exact(read_metrics(part)) == _exact(read_metrics(tmp_path / "full"))
    assert resumed.summary == {**full.summary, **{k: resumed.summary[k] for k in _CLOCK}}


_CLOCK = ("tokens_per_s", "tokens_per_s_with_warmup", "train_time_s", "wall_time_s")
