"""Delayed scaling in MXLinear: one history entry per optimizer step, saturation, checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from mxfp8.layers.convert import convert_model, load_scaling_state_dict, scaling_state_dict
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe

D = 64


def _layer(name="fp8-delayed", seed=0):
    torch.manual_seed(seed)
    return MXLinear(D, D, bias=False, recipe=recipe(name))


def _step(layer, opt, xs, dys):
    for x, dy in zip(xs, dys, strict=True):  # micro-batches of one optimizer step
        layer(x).backward(dy)
    opt.step()
    opt.zero_grad()


def _batch(amax, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(32, D, generator=g) * 2 - 1
    x[0, 0] = amax  # pins the amax of the batch
    return x


def test_history_advances_once_per_optimizer_step():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    st = layer.delayed_state
    tr = st.trackers
    dy = [torch.full((32, D), 0.5), torch.full((32, D), 0.25)]
    w0_amax = layer.weight.detach().abs().max()
    _step(layer, opt, [_batch(1.0, 0), _batch(3.0, 1)], dy)
    assert tr["input"].count == 0  # step 1's amaxes are pending until the next step starts
    _step(layer, opt, [_batch(2.0, 2), _batch(0.5, 3)], dy)
    assert [tr[o].count for o in ("input", "weight", "grad_output")] == [1, 1, 1]
    assert tr["input"].amax_history.tolist() == [3.0]  # max over step 1's micro-batches
    assert tr["grad_output"].amax_history.tolist() == [0.5]
    assert torch.equal(tr["weight"].amax_history, w0_amax.reshape(1))
    layer(_batch(7.0, 4))  # step 3 begins: step 2 is committed
    assert tr["input"].amax_history.tolist() == [2.0, 3.0]
    with torch.no_grad():  # evaluation records nothing
        layer(_batch(100.0, 5))
    assert st.pending["input"].item() == 7.0


def test_delayed_scale_is_used_and_an_outlier_saturates():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # lr 0: still an optimizer step
    seen = {}
    layer.observer = lambda lyr, gemm, op, hp, q: seen.__setitem__((gemm, op), q)
    dy = [torch.ones(32, D)]
    for s in range(3):
        with torch.no_grad():
            layer.weight.add_(0.0)  # bump the version: a step happened (SGD with lr 0 may not)
        _step(layer, opt, [_batch(1.0, s)], dy)
    x = _batch(1.0, 9)
    x[5, 7] = 1000.0  # an outlier the history has never seen
    with torch.no_grad():
        layer.weight.add_(0.0)
    layer(x).backward(torch.ones(32, D))
    q = seen["fprop", "input"]
    assert torch.equal(q.scale, torch.tensor(448.0))  # dest_max / history amax (1.0)
    assert q.data.float().abs().max().item() == 448.0  # saturated to E4M3's largest
    assert q.dequantize()[5, 7].item() == 1.0  # 1000 came back as 1: the delayed-scaling risk
    with torch.no_grad():
        layer.weight.add_(0.0)
    layer(x)  # next step: the history now holds 1000, nothing saturates
    q = seen["fprop", "input"]
    assert abs(q.dequantize()[5, 7].item() - 1000.0) < 1e-3  # 448 / (448 / 1000), fp32


def test_ema_variant_reduces_history_with_decay():
    layer = _layer("fp8-delayed-ema")
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    dy = [torch.ones(32, D)]
    for amax in (2.0, 4.0, 1.0):
        _step(layer, opt, [_batch(amax, 0)], dy)
    tr = layer.delayed_state.trackers["input"]
    assert tr.count == 2  # the third step is pending
    expected = torch.tensor(0.9) * 2.0 + torch.tensor(0.1) * 4.0
    assert torch.equal(tr.reduced_amax(), expected)


def _model(seed):
    torch.manual_seed(seed)
    m = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(D, D), nn.Linear(D, D)])})
    return convert_model(m, recipe("fp8-delayed"))


def _train(model, steps, seed):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(steps):
        x = torch.randn(32, D, generator=g)
        y = model["layers"][1](model["layers"][0](x))
        y.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(y.detach())
    return outs


def test_scaling_state_round_trip_resumes_identically():
    a = _model(0)
    _train(a, 3, seed=1)
    state = scaling_state_dict(a)
    assert set(state) == {"layers.0", "layers.1"}
    assert list(a.state_dict()) == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    b = _model(5)
    b.load_state_dict(a.state_dict())
    load_scaling_state_dict(b, state)
    ya = _train(a, 2, seed=2)
    yb = _train(b, 2, seed=2)
    for u, v in zip(ya, yb, strict=True):
        assert torch.equal(u, v)
    assert scaling_state_dict(a)["layers.0"]["trackers"]["input"]["count"] == 4
