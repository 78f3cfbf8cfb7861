"""Delayed scaling in MXLinear: one history entry per step window (or per training forward
outside windows), saturation, checkpoints."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from mxfp8.layers.convert import convert_model, load_scaling_state_dict, scaling_state_dict
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe
from mxfp8.layers.step import step_window

D = 64


def _layer(name="fp8-delayed", seed=0):
    torch.manual_seed(seed)
    return MXLinear(D, D, bias=False, recipe=recipe(name))


def _step(layer, opt, xs, dys):
    """One optimizer step as the training loop runs it: micro-batches inside a window."""
    with step_window(layer):
        for x, dy in zip(xs, dys, strict=True):
            layer(x).backward(dy)
    opt.step()
    opt.zero_grad()


def _batch(amax, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(32, D, generator=g) * 2 - 1
    x[0, 0] = amax  # pins the amax of the batch
    return x


def _counts(layer):
    return [layer.delayed_state.trackers[o].count for o in ("input", "weight", "grad_output")]


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
    assert _counts(layer) == [1, 1, 1]
    assert tr["input"].amax_history.tolist() == [3.0]  # max over step 1's micro-batches
    assert tr["grad_output"].amax_history.tolist() == [0.5]
    assert torch.equal(tr["weight"].amax_history, w0_amax.reshape(1))
    with step_window(layer):  # step 3 begins: step 2 is committed
        layer(_batch(7.0, 4))
    assert tr["input"].amax_history.tolist() == [2.0, 3.0]
    with torch.no_grad():  # evaluation records nothing
        layer(_batch(100.0, 5))
    assert st.pending["input"].item() == 7.0


def test_history_advances_once_per_window_with_accumulation():
    """3 micro-batches per window, 2 windows: each window opening commits the previous
    window's amaxes (the max over its micro-batches) exactly once, even when no optimizer
    step wrote the weights in between (a skipped step): the version counter plays no part."""
    layer = _layer()
    tr = layer.delayed_state.trackers
    amaxes = [(1.0, 4.0, 2.0), (0.5, 0.25, 3.0)]
    for w, window in enumerate(amaxes):
        with step_window(layer):
            assert _counts(layer) == [w] * 3  # committed on opening, not before
            for micro, amax in enumerate(window):
                layer(_batch(amax, 10 * w + micro)).backward(torch.full((32, D), amax))
                assert _counts(layer) == [w] * 3  # micro-batches commit nothing
    assert tr["input"].amax_history.tolist() == [4.0]  # the second window is pending
    with step_window(layer):
        pass
    assert _counts(layer) == [2, 2, 2]
    assert tr["input"].amax_history.tolist() == [3.0, 4.0]
    assert tr["grad_output"].amax_history.tolist() == [3.0, 4.0]
    with step_window(layer):  # an empty window: nothing pending, nothing appended
        pass
    assert _counts(layer) == [2, 2, 2]


def test_outside_windows_each_training_forward_is_a_step():
    """A loop that never opens a window: each recording forward commits the previous
    forward's (and its backward's) amaxes first; evaluation commits and records nothing."""
    layer = _layer()
    tr = layer.delayed_state.trackers
    for i, amax in enumerate((1.0, 5.0, 2.0)):
        layer(_batch(amax, i)).backward(torch.full((32, D), 10 * amax))
        assert _counts(layer) == [i] * 3
    assert tr["input"].amax_history.tolist() == [5.0, 1.0]
    assert tr["grad_output"].amax_history.tolist() == [50.0, 10.0]
    with torch.no_grad():
        layer(_batch(100.0, 7))
    layer.eval()
    layer(_batch(100.0, 8))
    assert _counts(layer) == [2, 2, 2] and layer.delayed_state.pending["input"].item() == 2.0
    layer.train()
    layer(_batch(1.0, 9))
    assert tr["input"].amax_history.tolist() == [2.0, 5.0, 1.0]


def test_delayed_scale_is_used_and_an_outlier_saturates():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    seen = {}
    layer.observer = lambda lyr, gemm, op, hp, q: seen.__setitem__((gemm, op), q)
    dy = [torch.ones(32, D)]
    for s in range(3):
        _step(layer, opt, [_batch(1.0, s)], dy)
    x = _batch(1.0, 9)
    x[5, 7] = 1000.0  # an outlier the history has never seen
    with step_window(layer):
        layer(x).backward(torch.ones(32, D))
    q = seen["fprop", "input"]
    assert torch.equal(q.scale, torch.tensor(448.0))  # dest_max / history amax (1.0)
    assert q.data.float().abs().max().item() == 448.0  # saturated to E4M3's largest
    assert q.dequantize()[5, 7].item() == 1.0  # 1000 came back as 1: the delayed-scaling risk
    with step_window(layer):
        layer(x)  # next step: the history now holds 1000, nothing saturates
    q = seen["fprop", "input"]
    assert abs(q.dequantize()[5, 7].item() - 1000.0) < 1e-3  # 448 / (448 / 1000), fp32


def test_weight_amax_recorded_when_the_window_starts_with_an_eval_forward():
    """The cached weight's amax still counts if the window's first forward recorded nothing."""
    layer = _layer()
    with step_window(layer):
        with torch.no_grad():
            layer(_batch(1.0, 0))
        assert "weight" not in layer.delayed_state.pending
        layer(_batch(1.0, 1)).backward(torch.ones(32, D))
        assert layer.weight_quantizations == 1  # served from the cache
    w_amax = layer.weight.detach().abs().max()
    assert torch.equal(layer.delayed_state.pending["weight"], w_amax)


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


def _train(model, steps, seed, accum=1, windows=False):
    """``steps`` optimizer steps of ``accum`` micro-batches, inside step windows or not."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(steps):
        with step_window(model) if windows else contextlib.nullcontext():
            for _ in range(accum):
                x = torch.randn(32, D, generator=g)
                y = model["layers"][1](model["layers"][0](x))
                (y.pow(2).mean() / accum).backward()
                outs.append(y.detach())
        opt.step()
        opt.zero_grad()
    return outs


@pytest.mark.parametrize("accum, windows", [(1, False), (3, True)], ids=["plain", "windows"])
def test_scaling_state_round_trip_resumes_identically(accum, windows):
    """Saved after optimizer.step (window closed), the state holds the finished step's
    pending amaxes; the resumed run's next window commits them, as the uninterrupted run
    does, so both continue bit for bit."""
    a = _model(0)
    _train(a, 3, seed=1, accum=accum, windows=windows)
    state = scaling_state_dict(a)
    assert set(state) == {"layers.0", "layers.1"}
    assert set(state["layers.0"]["pending"]) == {"input", "weight", "grad_output"}
    assert list(a.state_dict()) == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    b = _model(5)
    b.load_state_dict(a.state_dict())
    load_scaling_state_dict(b, state)
    ya = _train(a, 2, seed=2, accum=accum, windows=windows)
    yb = _train(b, 2, seed=2, accum=accum, windows=windows)
    assert len(ya) == 2 * accum
    for u, v in zip(ya, yb, strict=True):
        assert torch.equal(u, v)
    assert scaling_state_dict(a)["layers.0"]["trackers"]["input"]["count"] == 4
    assert _same(scaling_state_dict(a), scaling_state_dict(b))  # histories and pending


def _same(u, v) -> bool:
    """Nested dicts of tensors and plain values, equal bit for bit."""
    if isinstance(u, dict):
        return isinstance(v, dict) and u.keys() == v.keys() and all(_same(u[k], v[k]) for k in u)
    if isinstance(u, torch.Tensor):
        return isinstance(v, torch.Tensor) and torch.equal(u, v)
    return u == v
