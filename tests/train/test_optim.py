"""AdamW groups, lr schedules, the dynamic loss scaler and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mxfp8.config.sections import ScheduleKind
from mxfp8.train.optim import (
    LossScaler,
    Schedule,
    build_optimizer,
    clip_gradients,
    lr_multiplier,
    param_groups,
)


class _Cfg:  # duck-typed stand-ins, so these tests do not depend on the config module
    def __init__(self, **kw):
        self.__dict__.update(kw)


def optim_cfg(**kw):
    base = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay_embeddings=True,
                states="fp32", grad_dtype="fp32")  # fmt: skip
    return _Cfg(**{**base, **kw})


def sched_cfg(kind, warmup=10, floor=0.1, decay_fraction=0.2):
    return _Cfg(kind=kind, warmup_steps=warmup, min_lr_ratio=floor, decay_fraction=decay_fraction)


def scale_cfg(**kw):
    base = dict(init_scale=2.0**4, growth_interval=3, growth_factor=2.0, backoff_factor=0.5,
                min_scale=1.0)  # fmt: skip
    return _Cfg(**{**base, **kw})


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_param_groups_no_decay_on_vectors_and_tied_listed_once():
    m = Tiny()
    groups = param_groups(m, optim_cfg())
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert decay == {id(m.emb.weight), id(m.lin.weight)}
    assert no_decay == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias)}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    groups = param_groups(m, optim_cfg(decay_embeddings=False))
    assert id(m.emb.weight) in {id(p) for p in groups[1]["params"]}


def test_schedule_warmup_cosine_shape():
    cfg = sched_cfg(ScheduleKind.WARMUP_COSINE, warmup=10, floor=0.1)
    m = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(m[:9], m[1:10], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(m[9:], m[10:], strict=False))  # then decays
    assert m[-1] == pytest.approx(0.1)  # reaches the floor at the last step
    assert m[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_schedule_constant_and_wsd_shapes():
    const = [lr_multiplier(s, 50, sched_cfg(ScheduleKind.CONSTANT, warmup=5)) for s in range(50)]
    assert const[4] == 1.0 and set(const[4:]) == {1.0}
    wsd = [lr_multiplier(s, 100, sched_cfg(ScheduleKind.WSD, 10, 0.0, 0.2)) for s in range(100)]
    assert set(wsd[9:80]) == {1.0}  # stable phase
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:], strict=False))  # linear decay
    assert wsd[-1] == pytest.approx(0.0)
    assert wsd[80] - wsd[81] == pytest.approx(wsd[90] - wsd[91])


def test_schedule_sets_group_lrs():
    opt = build_optimizer(Tiny(), optim_cfg(lr=0.5))
    sched = Schedule(opt, sched_cfg(ScheduleKind.WARMUP_COSINE, warmup=4), total=20)
    assert sched.set_step(1) == pytest.approx(0.25)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.25)] * 2


def test_loss_scaler_backoff_skip_and_growth():
    s = LossScaler(scale_cfg(), enabled=True)
    assert s.scale == 16.0
    s.update(found_inf=True)
    assert (s.scale, s.skipped_steps, s.good_steps) == (8.0, 1, 0)
    s.update(False), s.update(False)
    assert s.scale == 8.0
    s.update(False)  # third clean step in a row: grow
    assert (s.scale, s.good_steps) == (16.0, 0)
    for _ in range(10):
        s.update(True)
    assert s.scale == 1.0 and s.skipped_steps == 11  # floored at min_scale
    state = s.state_dict()
    t = LossScaler(scale_cfg(), enabled=True)
    t.load_state_dict(state)
    assert t.state_dict() == state


def test_disabled_scaler_keeps_scale_one_but_counts_skips():
    s = LossScaler(scale_cfg(), enabled=False)
    assert s.scale == 1.0
    s.update(True)
    assert s.scale == 1.0 and s.skipped_steps == 1


def test_loss_scaling_is_exact_with_powers_of_two():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    x = torch.randn(8, 32)
    lin(x).square().mean().backward()
    ref = lin.weight.grad.clone()
    lin.zero_grad()
    s = LossScaler(scale_cfg(init_scale=2.0**12), enabled=True)
    s.scale_loss(lin(x).square().mean()).backward()
    s.unscale_(lin.parameters())
    assert torch.equal(lin.weight.grad, ref)


def _with_grads(grads: dict[str, torch.Tensor]) -> list[tuple[str, nn.Parameter]]:
    out = []
    for name, g in grads.items():
        p = nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        out.append((name, p))
    return out


def test_global_clipping():
    named = _with_grads({"a": torch.full((4,), 3.0), "b": torch.full((4,), 4.0)})
    norm, found_inf = clip_gradients(named, max_norm=1.0)
    assert not found_inf and norm == pytest.approx(10.0)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad for _, p in named]))
    assert clipped.item() == pytest.approx(1.0, rel=1e-5)
    named = _with_grads({"a": torch.full((4,), 0.1)})
    before = named[0][1].grad.clone()
    clip_gradients(named, max_norm=1.0)
    assert torch.equal(named[0][1].grad, before)  # below the threshold: untouched


def test_per_module_clipping_only_touches_matching_params():
    named = _with_grads({"layers.0.attn.wq": torch.full((4,), 2.0), "out": torch.full((4,), 2.0)})
    norm, _ = clip_gradients(named, max_norm=0.0, module_thresholds=[("layers.*.attn.*", 1.0)])
    assert norm == pytest.approx(math.sqrt(32))
    assert torch.linalg.vector_norm(named[0][1].grad).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(named[1][1].grad, torch.full((4,), 2.0))


def test_non_finite_gradients_are_reported_and_left_alone():
    named = _with_grads({"a": torch.tensor([1.0, float("inf")]), "b": torch.ones(2)})
    norm, found_inf = clip_gradients(named, max_norm=1.0)
    assert found_inf and math.isinf(norm)
    assert torch.equal(named[1][1].grad, torch.ones(2))
    named = _with_grads({"a": torch.tensor([float("nan")])})
    assert clip_gradients(named, max_norm=1.0)[1]


def test_bf16_states_track_fp32_adamw():
    torch.manual_seed(0)
    ref, low = nn.Linear(16, 16), nn.Linear(16, 16)
    low.load_state_dict(ref.state_dict())
    opt_ref = build_optimizer(ref, optim_cfg())
    opt_low = build_optimizer(low, optim_cfg(states="bf16"))
    x = torch.randn(32, 16)
    for _ in range(5):
        for m, o in ((ref, opt_ref), (low, opt_low)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert opt_low.state[low.weight]["exp_avg"].dtype == torch.bfloat16
    assert low.weight.dtype == torch.float32
    assert not torch.equal(low.weight, ref.weight)  # the rounding is real...
    torch.testing.assert_close(low.weight, ref.weight, rtol=0, atol=2e-4)  # ...and small
