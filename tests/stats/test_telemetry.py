"""The telemetry collector and hook on real MXLinear layers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mxfp8
from mxfp8.stats.operand_stats import finalize, operand_stats
from mxfp8.stats.telemetry import TelemetryCollector, TelemetryHook, make_hook

SIX = {
    ("fprop", "input"),
    ("fprop", "weight"),
    ("dgrad", "grad_output"),
    ("dgrad", "weight"),
    ("wgrad", "grad_output"),
    ("wgrad", "input"),
}


def _model(recipe_name: str) -> nn.Module:
    torch.manual_seed(0)
    r = mxfp8.recipe(recipe_name)
    return nn.Sequential(
        mxfp8.MXLinear(64, 96, recipe=r, name="up"),
        nn.GELU(),
        mxfp8.MXLinear(96, 64, recipe=r, name="down"),
    )


def _step(model: nn.Module, x: torch.Tensor, micro: int = 1) -> None:
    for _ in range(micro):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()


@pytest.mark.parametrize("recipe_name", ["mxfp8", "fp8-tensorwise", "fp8-delayed"])
def test_one_record_per_layer_and_operand_then_detached(recipe_name):
    model = _model(recipe_name)
    x = torch.randn(64, 64, requires_grad=True)
    collector = TelemetryCollector(model)
    with collector.capture(7):
        _step(model, x, micro=2)  # the second micro-batch is not recorded again
    rows = collector.take()
    assert len(rows) == 2 * 6
    assert {(r["gemm"], r["operand"]) for r in rows if r["layer"] == "up"} == SIX
    assert all(r["step"] == 7 for r in rows)
    assert all(layer.observer is None for layer in collector.layers)
    for r in rows:
        json.dumps(r, allow_nan=False)
        assert 20 < r["sqnr_db"] < 40  # right orientation: a swapped one would be ~0 dB
    per_tensor = recipe_name.startswith("fp8")
    assert all(("scale" in r) == per_tensor for r in rows)
    assert all(("scale_exp_hist" in r) == (not per_tensor) for r in rows)
    assert all(("amax_history" in r) == (recipe_name == "fp8-delayed") for r in rows)


def test_records_equal_a_direct_measurement():
    """The fprop/input record is the statistic of quantize(x) along K, as the recipe says."""
    model = _model("mxfp8-floor")
    x = torch.randn(64, 64)
    collector = TelemetryCollector(model)
    with collector.capture(1):
        _step(model, x)
    rows = {(r["layer"], r["gemm"], r["operand"]): r for r in collector.take()}
    r = mxfp8.recipe("mxfp8-floor")
    # the layer quantizes its fp32 input itself (autocast does not cast it first)
    xq = mxfp8.quantize(x, r.fprop_input.elem(), block_size=32, scale_rule="floor")
    expected = finalize(operand_stats(x, xq))
    got = rows["up", "fprop", "input"]
    assert {k: got[k] for k in expected} == expected
    w = model[0].weight
    wq = mxfp8.quantize(w.detach(), r.fprop_weight.elem(), block_size=32, scale_rule="floor")
    expected_w = finalize(operand_stats(w.detach(), wq))
    assert {k: rows["up", "fprop", "weight"][k] for k in expected_w} == expected_w


def test_capture_leaves_the_training_math_unchanged():
    """Telemetry observes; the step's gradients are bit-identical with and without it."""
    grads = []
    for observe in (False, True):
        model = _model("mxfp8")
        x = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
        collector = TelemetryCollector(model)
        if observe:
            with collector.capture(1):
                _step(model, x)
        else:
            _step(model, x)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_bf16_model_has_nothing_to_observe():
    model = _model("bf16")
    collector = TelemetryCollector(model)
    with collector.capture(1):
        _step(model, torch.randn(64, 64))
    assert collector.layers == [] and collector.take() == []


def test_hook_writes_numerics_jsonl_on_telemetry_steps_only(tmp_path):
    model = _model("mxfp8")
    hook = make_hook(SimpleNamespace(run=SimpleNamespace(telemetry_every=2)), tmp_path)
    assert isinstance(hook, TelemetryHook)
    assert make_hook(SimpleNamespace(run=SimpleNamespace(telemetry_every=0)), tmp_path) is None
    hook.on_train_start(SimpleNamespace(model=model, recipe="mxfp8"))
    x = torch.randn(64, 64)  # needs no grad: the first layer has no dgrad GEMM
    for step in range(1, 6):
        hook.on_step_start(step)
        _step(model, x)
        hook.on_step_end(step, {"step": step, "loss": 1.0})
    hook.on_train_end(None)
    rows = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [2, 4]
    assert len(rows) == 2 * (4 + 6)
    assert hook.latest and all(r["step"] == 4 for r in hook.latest)
    assert hook.summary() == {"telemetry_every": 2, "telemetry_steps": 2}


def test_double_start_is_an_error():
    collector = TelemetryCollector(_model("mxfp8"))
    collector.start(1)
    with pytest.raises(RuntimeError, match="already active"):
        collector.start(2)
    collector.stop()


def test_resume_drops_records_past_the_checkpoint(tmp_path):
    """Records an interrupted process wrote after its last checkpoint are written again by
    the resumed run, so they are removed first."""
    path = tmp_path / "numerics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "layer": "x"}) + "\n" for s in (2, 4, 6)))
    hook = TelemetryHook(2, tmp_path)
    hook.on_train_start(SimpleNamespace(model=_model("mxfp8"), recipe="mxfp8", start_step=4))
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]
