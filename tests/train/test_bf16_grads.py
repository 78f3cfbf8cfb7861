"""Gradients held in bf16 (optim.grad_dtype = 'bf16'): each gradient taken into a bf16 store as
autograd accumulates it, the step an fp32 AdamW on the bf16-rounded gradients, the clipping norm
that of the held gradients; in training: accumulation, loss scaling, non-finite steps."""

from __future__ import annotations

import math

import pytest
import torch
from adamw_reference import check_two_adamw_steps
from torch import nn
from train_faults import InjectNaN

from mxfp8.config.train_config import load_config
from mxfp8.optim.bf16_grads import BF16Grads
from mxfp8.train import golden
from mxfp8.train.loop import train
from mxfp8.train.optim import clip_gradients
from mxfp8.train.runlog import read_metrics


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 4))  # fmt: skip


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)


def loss_of(model: nn.Module, k: int) -> torch.Tensor:
    x, y = batch(k)
    return (model(x) - y).square().mean()


def fp32_grads(model: nn.Module, k: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, k).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_two_steps_are_adamw_on_the_bf16_rounded_gradients():
    model, ref = mlp(), mlp()
    store = BF16Grads(model.named_parameters(), hooks=True)

    def held_is_bf16(g):
        held = [store.held[id(p)] for p in model.parameters()]
        assert all(h.dtype == torch.bfloat16 for h in held)
        assert all(torch.equal(h, gi.bfloat16()) for h, gi in zip(held, g, strict=True))

    check_two_adamw_steps(model, ref, store, loss_of, fp32_grads,
                          held=lambda g: g.bfloat16().float(),
                          after_backward=held_is_bf16)  # fmt: skip


def test_at_most_one_fp32_gradient_exists_during_backward():
    model = mlp()
    params = list(model.parameters())
    most = []

    def count(_p):  # registered first: runs before the store takes this gradient
        most.append(sum(q.grad is not None for q in params))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    store = BF16Grads(model.named_parameters(), hooks=True)
    loss_of(model, 0).backward()
    assert len(most) == len(params) and max(most) == 1
    assert len(store.holders()) == len(params)


def test_accumulation_adds_each_micro_batch_into_the_bf16_store():
    model = mlp()
    g1, g2 = fp32_grads(model, 1), fp32_grads(model, 2)
    model.zero_grad(set_to_none=True)
    store = BF16Grads(model.named_parameters(), hooks=True)
    loss_of(model, 1).backward()
    loss_of(model, 2).backward()
    for p, a, b in zip(model.parameters(), g1, g2, strict=True):
        held = store.held[id(p)]
        assert held.dtype == torch.bfloat16
        # the sum in fp32 of what was held and the new gradient, rounded to bf16 once
        assert torch.equal(held, (a.bfloat16().float() + b).bfloat16())
        rel = float((held.float() - (a + b)).norm() / (a + b).norm())
        assert rel < 2**-7


def test_clipping_sees_the_norm_of_the_held_bf16_gradients():
    model = mlp()
    store = BF16Grads(model.named_parameters(), hooks=True)
    loss_of(model, 3).backward()
    held = [h.grad.double() for _, h in store.holders()]
    want = math.sqrt(sum(float(h.square().sum()) for h in held))
    norm, found_inf = clip_gradients(store.holders(), max_norm=want / 4)
    assert not found_inf
    assert norm == pytest.approx(want, rel=1e-6)
    after = math.sqrt(sum(float(h.grad.double().square().sum()) for _, h in store.holders()))
    assert after == pytest.approx(want / 4, rel=1e-2)  # the held tensors were clipped
    assert all(store.held[id(p)].dtype == torch.bfloat16 for p in model.parameters())


def cfg(out, cache, **over):
    base = {**golden.OVERRIDES, "data.cache_dir": str(cache), "recipe.name": "bf16"}
    return load_config(None, {**base, "run.out": str(out), "run.steps": 4, **over})


def test_training_with_bf16_grads_accumulation_and_loss_scaling(tmp_path, data_cache):
    """grad_accum 2 with dynamic loss scaling on: the logged norm is the unscaled norm of the
    held gradients (within bf16 rounding of the fp32 one, far from a scale left in), and the
    run trains like the fp32-gradient run."""
    over = {"run.grad_accum": 2, "loss_scale.enabled": "on", "run.log_every": 1}
    train(cfg(tmp_path / "fp32", data_cache, **over))
    train(cfg(tmp_path / "bf16", data_cache, **over, **{"optim.grad_dtype": "bf16"}))
    a, b = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    assert [m["loss_scale"] for m in b] == [m["loss_scale"] for m in a] and a[0]["loss_scale"] > 1
    assert a[0]["loss"] == b[0]["loss"]  # the same weights and batch
    for x, y in zip(a, b, strict=True):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-2)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3)
    assert b[-1]["loss"] < b[0]["loss"]


def test_a_nonfinite_bf16_gradient_skips_the_step(tmp_path, data_cache):
    result = train(cfg(tmp_path / "run", data_cache, **{"optim.grad_dtype": "bf16"}),
                   hooks=[InjectNaN("layers.0.feed_forward", {2}, where="backward")])  # fmt: skip
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert math.isfinite(rows[2]["loss"]) and rows[2]["nonfinite"] == "gradients"
    assert result.skipped_steps == 1 and result.completed
    assert math.isfinite(result.final_val_loss)  # the NaN never reached the weights
