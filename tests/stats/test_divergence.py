"""Loss-spike / NaN detection and the layers it blames."""

from __future__ import annotations

import json
import logging
import math
import random
from types import SimpleNamespace

import pytest

from mxfp8.stats.divergence import (
    DivergenceConfig,
    DivergenceHook,
    SpikeDetector,
    make_hook,
    rank_layer_changes,
)


def _curve(n: int, seed: int = 0, noise: float = 0.05) -> list[float]:
    """A pre-training-like loss: fast decay then a slow one, with noise."""
    rng = random.Random(seed)
    return [2.0 + 4.0 * math.exp(-s / 30) + rng.gauss(0, noise) for s in range(n)]


def _flags(losses, config=None):
    det = SpikeDetector(config)
    return [(s, k) for s, loss in enumerate(losses) if (k := det.update(loss)) is not None]


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_decreasing_curve_raises_no_flag(seed):
    assert _flags(_curve(2000, seed)) == []


def test_a_spike_is_flagged_once_at_its_onset():
    losses = _curve(300)
    for s in range(150, 154):  # a 4-step spike of +60 %
        losses[s] *= 1.6
    assert _flags(losses) == [(150, "spike")]


def test_a_small_bump_under_the_relative_floor_is_not_a_spike():
    losses = [3.0] * 100  # noise-free: the spread is 0, so min_rel decides
    losses[60] = 3.2  # +6.7 % < 10 %
    losses[80] = 3.5  # +16.7 %
    assert _flags(losses) == [(80, "spike")]


def test_nan_is_flagged_even_during_warmup_and_only_once_per_run_of_nans():
    losses = [5.0, float("nan"), float("nan"), 4.0, 3.9, float("inf")]
    assert _flags(losses) == [(1, "nan"), (5, "nan")]


def test_a_new_level_is_accepted_after_a_while():
    losses = _curve(200, noise=0.01) + [3.5] * 400  # loss jumps and stays up
    flags = _flags(losses)
    assert flags == [(200, "spike")]
    det = SpikeDetector()
    for loss in losses:
        det.update(loss)
    assert not det.in_event  # the baseline caught up with the new level


def test_config_is_validated():
    with pytest.raises(ValueError, match="ema_decay"):
        DivergenceConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="sigmas"):
        DivergenceConfig(sigmas=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        DivergenceConfig(warmup_steps=-1)


def test_make_hook_uses_the_run_configs_thresholds(tmp_path):
    config = DivergenceConfig(warmup_steps=0, min_rel=0.5, sigmas=1.0)
    hook = make_hook(SimpleNamespace(divergence=config), tmp_path)
    assert hook.detector.config is config
    for step, loss in enumerate([4.0, 4.0, 5.0, 7.0], start=1):  # +25 % passes, +75 % trips
        hook.on_step_end(step, {"loss": loss})
    assert [(e.step, e.kind) for e in hook.events] == [(4, "spike")]


def _rows(step, amax_scale=1.0, sqnr_drop=0.0):
    rows = []
    for layer in ("l0", "l1", "l2"):
        for gemm, operand in (("fprop", "input"), ("wgrad", "grad_output")):
            bad = layer == "l1" and operand == "grad_output"
            rows.append({
                "step": step, "layer": layer, "gemm": gemm, "operand": operand,
                "amax": 2.0 * (amax_scale if bad else 1.0),
                "sqnr_db": 31.0 - (sqnr_drop if layer == "l2" and operand == "input" else 0),
                "saturated_pct": 0.0, "underflow_pct": 0.1,
            })  # fmt: skip
    return rows


def test_ranking_blames_the_operand_that_moved_most():
    rows = _rows(10) + _rows(20, amax_scale=64.0, sqnr_drop=12.0)
    top = rank_layer_changes(rows, step=25, top=2)
    assert [(t["layer"], t["operand"]) for t in top] == [("l1", "grad_output"), ("l2", "input")]
    assert top[0]["amax_ratio"] == 64.0 and top[0]["score"] == pytest.approx(6.0)
    assert top[1]["sqnr_change_db"] == -12.0
    # telemetry after the event is not used
    assert rank_layer_changes(rows, step=15, top=2)[0]["from_step"] == 10
    assert rank_layer_changes(rows, step=5) == []


def test_hook_writes_events_and_logs(tmp_path, caplog):
    with (tmp_path / "numerics.jsonl").open("w") as fh:
        for r in _rows(100) + _rows(150, amax_scale=100.0):
            fh.write(json.dumps(r) + "\n")
    hook = DivergenceHook(tmp_path)
    losses = _curve(300)
    losses[160] = 20.0
    with caplog.at_level(logging.WARNING, logger="mxfp8.stats.divergence"):
        for step, loss in enumerate(losses, start=1):
            hook.on_step_end(step, {"step": step, "loss": loss})
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["kind"]) for e in events] == [(161, "spike")]
    assert events[0]["loss"] == 20.0 and events[0]["baseline"] < 3.0
    assert events[0]["layers"][0]["layer"] == "l1"
    assert "step 161: loss spike" in caplog.text and "l1 (wgrad/grad_output)" in caplog.text
    assert hook.summary() == {"diverged": False, "divergence_events": 1}  # it recovered


def test_hook_summary_reports_a_nan_run_as_diverged(tmp_path):
    hook = DivergenceHook(tmp_path)
    for step, loss in enumerate([4.0, 3.9, float("nan")], start=1):
        hook.on_step_end(step, {"loss": loss})
    assert hook.summary() == {"diverged": True, "divergence_events": 1}
    event = json.loads((tmp_path / "events.jsonl").read_text())
    assert event["kind"] == "nan" and event["loss"] is None and event["layers"] == []


def test_resume_keeps_earlier_events_and_rebuilds_the_baseline(tmp_path):
    losses = _curve(200)
    with (tmp_path / "metrics.jsonl").open("w") as fh:
        for step, loss in enumerate(losses[:100], start=1):
            fh.write(json.dumps({"step": step, "loss": loss}) + "\n")
    (tmp_path / "events.jsonl").write_text(
        json.dumps({"step": 50, "kind": "spike", "loss": 9.0, "baseline": 3.0,
                    "threshold": 0.3, "layers": []}) + "\n"
        + json.dumps({"step": 120, "kind": "spike", "loss": 9.0, "baseline": 3.0,
                      "threshold": 0.3, "layers": []}) + "\n"
    )  # fmt: skip
    hook = DivergenceHook(tmp_path)
    hook.on_train_start(SimpleNamespace(start_step=100))
    assert [e.step for e in hook.events] == [50]  # the event past step 100 is forgotten
    uninterrupted = SpikeDetector()
    for loss in losses[:100]:  # every step was logged here, so the replay is exact
        uninterrupted.update(loss)
    assert hook.detector.baseline == uninterrupted.baseline
    assert hook.detector.spread == uninterrupted.spread
    hook.on_step_end(101, {"loss": losses[100] * 3})  # past warm-up already: flagged
    assert [e.step for e in hook.events] == [50, 101]
