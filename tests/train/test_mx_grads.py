"""Gradients held as MX (optim.grad_dtype = 'mx'): each matrix gradient stored as the reference
quantizer's E4M3 codes and E8M0 scales of the fp32 gradient, the rest in bf16; the step fp32
AdamW on the decoded gradients; unscaling and clipping multiply a scalar and see the fp32 norm;
accumulation in bf16, rounded to MX once; in training: loss scaling, non-finite steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from adamw_reference import check_two_adamw_steps
from torch import nn
from train_faults import InjectNaN

from mxfp8.config.train_config import load_config
from mxfp8.numerics.reference import ref_dequantize, ref_quantize
from mxfp8.optim.mx_grads import MXGrads, MXHeldGrad
from mxfp8.train import golden
from mxfp8.train.loop import train
from mxfp8.train.optim import LossScaler, clip_gradients
from mxfp8.train.runlog import read_metrics


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def mlp(seed: int = 0) -> nn.Module:
    """Three matrices with a last dim of 32 or 64 (held as MX) and three biases (bf16)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 4))  # fmt: skip


def loss_of(model: nn.Module, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + k)
    x, y = torch.randn(32, 32, generator=g), torch.randn(32, 4, generator=g)
    return (model(x) - y).square().mean() * 100  # gradients of order 1: not all E4M3 subnormals


def fp32_grads(model: nn.Module, k: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, k).backward()
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def reference_held(g: torch.Tensor) -> torch.Tensor:
    """What the store must hold for fp32 gradient ``g``, as float64: the reference quantizer's
    MX (E4M3, rceil, 32 along the last dim) of a matrix, bf16 of a vector."""
    if g.dim() == 1:
        return g.bfloat16().double()
    codes, bits = ref_quantize(g.numpy(), "e4m3", scale_rule="rceil")
    return torch.from_numpy(ref_dequantize(codes, bits, "e4m3"))


def test_held_codes_are_the_reference_mx_of_the_fp32_gradient():
    model = mlp()
    want = fp32_grads(model, 0)
    store = MXGrads(model.named_parameters(), hooks=True)
    loss_of(model, 0).backward()
    assert all(p.grad is None for p in model.parameters()), "no fp32 gradient is left"
    n_mx = 0
    for p, g in zip(model.parameters(), want, strict=True):
        held = store.mx[id(p)]
        if p.dim() == 2:
            n_mx += 1
            codes, bits = ref_quantize(g.numpy(), "e4m3", scale_rule="rceil")
            assert np.array_equal(held.codes.numpy(), codes)
            assert np.array_equal(held.scale.numpy(), bits)
            assert held.nbytes() == g.numel() + g.numel() // 32
        else:
            assert torch.equal(held.dense, g.bfloat16())
        # the true sum of squares, of the fp32 gradient (not of its rounding)
        assert float(held.sq) == pytest.approx(float(g.double().square().sum()), rel=1e-12)
        assert torch.equal(held.local_fp32().double(), reference_held(g))
    assert n_mx == 3


def test_two_steps_are_adamw_on_the_decoded_mx_gradients():
    model, ref = mlp(), mlp()
    store = MXGrads(model.named_parameters(), hooks=True)
    check_two_adamw_steps(model, ref, store, loss_of, fp32_grads, held=reference_held)


def test_unscaling_and_clipping_multiply_a_scalar_and_see_the_fp32_norm():
    model = mlp()
    g = fp32_grads(model, 3)
    scale = 1024.0
    store = MXGrads(model.named_parameters(), hooks=True)
    (loss_of(model, 3) * scale).backward()
    before = {id(p): (h.codes, h.scale, h.dense) for p, h in
              ((p, store.mx[id(p)]) for p in model.parameters())}  # fmt: skip
    scaler = LossScaler.__new__(LossScaler)
    scaler.scale = scale
    scaler.unscale_(h for _, h in store.holders())
    true = math.sqrt(sum(float(gi.double().square().sum()) for gi in g))
    held = math.sqrt(sum(float(h.grad.local_fp32().double().square().sum())
                         for _, h in store.holders()))  # fmt: skip
    assert abs(held / true - 1) > 1e-4, "the MX rounding moves the norm: the check can tell"
    norm, found_inf = clip_gradients(store.holders(), max_norm=true / 4)
    assert not found_inf
    assert norm == pytest.approx(true, rel=1e-6)  # the fp32 gradients' norm, unscaled
    coef = (true / 4) / (norm + 1e-6)
    for p in model.parameters():
        h = store.mx[id(p)]
        assert h.mult == pytest.approx(coef / scale, rel=1e-12)
        codes, sc, dense = before[id(p)]
        assert h.codes is codes and h.scale is sc and h.dense is dense  # nothing re-rounded
    after = math.sqrt(sum(float(h.grad.sq) for _, h in store.holders()))
    assert after == pytest.approx(true / 4, rel=1e-5)


def test_accumulation_is_in_bf16_and_the_sum_is_rounded_to_mx_once():
    model = mlp()
    g1, g2 = fp32_grads(model, 1), fp32_grads(model, 2)
    store = MXGrads(model.named_parameters(), hooks=True)
    store.last = False
    loss_of(model, 1).backward()
    assert not store.mx and all(h.dtype == torch.bfloat16 for h in store.held.values())
    store.last = True
    loss_of(model, 2).backward()
    assert not store.held, "the bf16 accumulation store is emptied into MX"
    for p, a, b in zip(model.parameters(), g1, g2, strict=True):
        total = a.bfloat16().float() + b  # the bf16 sum of earlier micro-batches, plus the last
        assert torch.equal(store.mx[id(p)].local_fp32().double(), reference_held(total))


def test_a_nonfinite_gradient_makes_the_norm_nonfinite():
    model = mlp()
    store = MXGrads(model.named_parameters(), hooks=True)
    loss_of(model, 0).backward()
    assert not clip_gradients(store.holders(), max_norm=1.0)[1]
    store.clear()
    (loss_of(model, 0) * float("inf")).backward()
    norm, found_inf = clip_gradients(store.holders(), max_norm=1.0)
    assert found_inf and not math.isfinite(norm)


def test_empty_and_odd_shapes_are_held_in_bf16():
    w = torch.zeros(8, 48)  # 48 is not a multiple of 32
    held = MXHeldGrad(torch.randn(8, 48), w, {"compiled": False, "kernel": None})
    assert held.codes is None and held.dense.dtype == torch.bfloat16


def cfg(out, cache, **over):
    base = {**golden.OVERRIDES, "data.cache_dir": str(cache), "recipe.name": "mxfp8"}
    return load_config(None, {**base, "run.out": str(out), "run.steps": 4, **over})


def test_training_with_mx_grads_accumulation_and_loss_scaling(tmp_path, data_cache):
    """grad_accum 2 with dynamic loss scaling on: the logged norm is the unscaled fp32 norm
    (the bf16 accumulation's rounding aside), and the run trains like the fp32-gradient run."""
    over = {"run.grad_accum": 2, "loss_scale.enabled": "on", "run.log_every": 1}
    train(cfg(tmp_path / "fp32", data_cache, **over))
    train(cfg(tmp_path / "mx", data_cache, **over, **{"optim.grad_dtype": "mx"}))
    a, b = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "mx")
    assert [m["loss_scale"] for m in b] == [m["loss_scale"] for m in a] and a[0]["loss_scale"] > 1
    assert a[0]["loss"] == b[0]["loss"]  # the same weights and batch
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-2)
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-2)
    assert b[-1]["loss"] < b[0]["loss"]
    assert any(y["loss"] != x["loss"] for x, y in zip(a[1:], b[1:], strict=True))


def test_a_nonfinite_mx_gradient_skips_the_step(tmp_path, data_cache):
    result = train(cfg(tmp_path / "run", data_cache, **{"optim.grad_dtype": "mx"}),
                   hooks=[InjectNaN("layers.0.feed_forward", {2}, where="backward")])  # fmt: skip
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert math.isfinite(rows[2]["loss"]) and rows[2]["nonfinite"] == "gradients"
    assert result.skipped_steps == 1 and result.completed
    assert math.isfinite(result.final_val_loss)
