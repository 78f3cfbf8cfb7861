"""The step window: the weight cache lives only inside one, so no write to a weight goes stale.

Regression tests for the stale-weight bug: the cache used to be keyed on the weight's version
counter and storage pointer only, and ``p.data.mul_(2)`` (or ``p.data.copy_``) changes
neither, so the next forward reused the old quantized weight. Every test compares, bit for
bit, against a layer that cannot cache (``cache_weights = False``) or a fresh layer holding the
new weights, and checks that the write changed the output (so the comparison is not vacuous).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mxfp8
import mxfp8.layers
from mxfp8.layers.convert import convert_model
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe
from mxfp8.layers.step import step_window

D = 64
CACHING = ["mxfp8", "fp8-tensorwise"]  # recipes whose outputs depend on the weight only
PER_STEP = {"mxfp8": 2, "fp8-tensorwise": 1, "fp8-delayed": 1}  # weight copies per step


def _layer(name: str, seed: int = 0, bias: bool = True) -> MXLinear:
    torch.manual_seed(seed)
    return MXLinear(D, D, bias=bias, recipe=recipe(name))


def _fresh_like(layer: MXLinear) -> MXLinear:
    """A new layer holding ``layer``'s current values, that never caches."""
    ref = MXLinear(D, D, bias=layer.bias is not None, recipe=layer.recipe)
    ref.load_state_dict(layer.state_dict())
    if layer.delayed_state is not None:
        ref.delayed_state.load_state_dict(layer.delayed_state.state_dict())
    ref.cache_weights = False
    return ref


def _x(seed: int, rows: int = 32) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def _fwd_bwd(layer: MXLinear, x: torch.Tensor, dy: torch.Tensor):
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    y.backward(dy)
    return y.detach(), xi.grad


def _write_data_mul(layer):
    layer.weight.data.mul_(2)


def _write_data_copy(layer):
    layer.weight.data.copy_(torch.randn(D, D, generator=torch.Generator().manual_seed(7)) / 8)


def _write_load_state_dict(layer):
    other = nn.Linear(D, D)
    with torch.no_grad():
        other.weight.copy_(torch.randn(D, D, generator=torch.Generator().manual_seed(8)) / 8)
    layer.load_state_dict(other.state_dict())


def _write_copy_no_grad(layer):
    with torch.no_grad():
        layer.weight.copy_(layer.weight * -0.5)


def _write_to(layer):
    # a round trip through bf16 changes the values (rounding) and may reuse the storage
    layer.to(torch.bfloat16).to(torch.float32)


def _write_optimizer(layer):
    layer.weight.grad = torch.ones_like(layer.weight)
    torch.optim.SGD([layer.weight], lr=0.05).step()
    layer.weight.grad = None


WRITES = {
    "data.mul_": _write_data_mul,
    "data.copy_": _write_data_copy,
    "load_state_dict": _write_load_state_dict,
    "copy_-no_grad": _write_copy_no_grad,
    "to": _write_to,
    "optimizer.step": _write_optimizer,
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("name", CACHING)
def test_forward_after_any_weight_write_uses_new_values(name, write):
    """Outside a window: a forward after the write equals a fresh layer and cache_weights=False
    (the old version-keyed cache returned the old output after ``.data`` writes)."""
    layer = _layer(name)
    x, dy = _x(1), _x(2)
    before = _fwd_bwd(layer, x, dy)  # the old code cached the weight here
    layer.weight.grad = None
    WRITES[write](layer)
    got = _fwd_bwd(layer, x, dy)
    ref = _fresh_like(layer)
    want = _fwd_bwd(ref, x, dy)
    assert not torch.equal(got[0], before[0]), "the write must change the output"
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(layer.weight.grad, ref.weight.grad)
    layer.cache_weights = False  # and the same as the layer itself with its cache off
    assert torch.equal(layer(x), got[0])


@pytest.mark.parametrize("write", ["data.mul_", "data.copy_"])
def test_delayed_forward_after_data_write_uses_new_values(write):
    """fp8-delayed: the weight is quantized fresh with the history's scale (state copied)."""
    layer = _layer("fp8-delayed")
    x, dy = _x(1), _x(2)
    for _ in range(2):  # a history exists: the delayed scale is in use
        before = _fwd_bwd(layer, x, dy)
    WRITES[write](layer)
    ref = _fresh_like(layer)  # same weights, same history and pending amaxes
    got, want = _fwd_bwd(layer, x, dy), _fwd_bwd(ref, x, dy)
    assert not torch.equal(got[0], before[0])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CACHING)
def test_outside_a_window_every_forward_quantizes_the_weight(name):
    layer = _layer(name)
    x, dy = _x(1), _x(2)
    for i in range(3):
        _fwd_bwd(layer, x, dy)
        assert layer.weight_quantizations == PER_STEP[name] * (i + 1)
        assert not layer._weight_cache  # nothing is kept between calls


@pytest.mark.parametrize("name", [*CACHING, "fp8-delayed"])
def test_window_quantizes_weight_once_and_matches_no_cache(name):
    """N micro-batches in one window: one quantization per weight copy, bit-identical to
    a layer without cache (y, dx per micro-batch; accumulated dW and bias grad)."""
    layer = _layer(name)
    ref = _fresh_like(layer)
    for step in range(2):
        counts = (layer.weight_quantizations, ref.weight_quantizations)
        with step_window(layer), step_window(ref):
            for micro in range(4):
                x, dy = _x(10 * step + micro), _x(100 + 10 * step + micro)
                for a, b in zip(_fwd_bwd(layer, x, dy), _fwd_bwd(ref, x, dy), strict=True):
                    assert torch.equal(a, b)
        assert layer.weight_quantizations - counts[0] == PER_STEP[name]
        assert ref.weight_quantizations - counts[1] == 4 * PER_STEP[name]  # no cache: each
        assert torch.equal(layer.weight.grad, ref.weight.grad)
        assert torch.equal(layer.bias.grad, ref.bias.grad)
        for lyr in (layer, ref):
            torch.optim.SGD(lyr.parameters(), lr=0.1).step()
            lyr.zero_grad()


@pytest.mark.parametrize("name", CACHING)
def test_next_window_sees_a_data_write_made_after_close(name):
    layer = _layer(name)
    x, dy = _x(1), _x(2)
    with step_window(layer):
        y1, _ = _fwd_bwd(layer, x, dy)
        assert layer._weight_cache  # cached inside the window
    assert not layer._weight_cache  # dropped on close
    n = layer.weight_quantizations
    layer.weight.data.mul_(2)
    with step_window(layer):
        y2, dx2 = _fwd_bwd(layer, x, dy)
    assert layer.weight_quantizations == n + PER_STEP[name]
    assert not torch.equal(y1, y2)
    want = _fwd_bwd(_fresh_like(layer), x, dy)
    assert torch.equal(y2, want[0]) and torch.equal(dx2, want[1])


@pytest.mark.parametrize("name", CACHING)
def test_replaced_parameter_inside_a_window_is_caught(name):
    """Belt and braces: the version/storage key still guards the cache inside a window."""
    layer = _layer(name, bias=False)
    x = _x(1)
    with step_window(layer):
        y1 = layer(x)
        layer.weight = nn.Parameter(layer.weight.detach() * 3)
        y2 = layer(x)
        with torch.no_grad():
            layer.weight.mul_(0.5)  # a tracked in-place update bumps the version
        y3 = layer(x)
    ref = _fresh_like(layer)
    assert not torch.equal(y1, y2) and not torch.equal(y2, y3)
    assert torch.equal(y3, ref(x))


@pytest.mark.parametrize("name", [*CACHING, "fp8-delayed"])
def test_a_window_of_one_micro_batch_keeps_no_cache_and_changes_no_bit(name):
    """One forward per step: nothing to reuse, so the window caches nothing (the copies
    would only add to the step's peak memory), with the same numbers as a caching window."""
    layer, ref = _layer(name), None
    ref = _fresh_like(layer)
    ref.cache_weights = True
    for step in range(2):
        x, dy = _x(10 * step), _x(100 + step)
        n = layer.weight_quantizations
        with step_window(layer, micro_batches=1):
            got = _fwd_bwd(layer, x, dy)
            assert not layer._weight_cache and layer.weight_cache_nbytes() == 0
        with step_window(ref):
            want = _fwd_bwd(ref, x, dy)
            assert ref._weight_cache  # the caching window does keep them
        assert layer.weight_quantizations - n == PER_STEP[name]  # each copy made once anyway
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(layer.weight.grad, ref.weight.grad)
        for lyr in (layer, ref):
            torch.optim.SGD(lyr.parameters(), lr=0.1).step()
            lyr.zero_grad()
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        with step_window(layer, micro_batches=0):
            pass


def test_cache_weights_false_turns_the_cache_off_inside_a_window():
    layer = _layer("mxfp8")
    layer.cache_weights = False
    with step_window(layer):
        for _ in range(3):
            _fwd_bwd(layer, _x(1), _x(2))
        assert not layer._weight_cache
    assert layer.weight_quantizations == 6


def test_window_closes_when_the_body_raises():
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
    convert_model(model, recipe("mxfp8", convert=["*"]))
    layers = [model[0], model[2]]
    with pytest.raises(ZeroDivisionError), step_window(model):
        model(_x(1)).sum().backward()
        assert all(m._window_open and m._weight_cache for m in layers)
        raise ZeroDivisionError
    assert not any(m._window_open or m._weight_cache for m in layers)
    with step_window(model):  # and a new one opens normally
        model(_x(1))


def test_windows_do_not_nest():
    """Nested use on the same model (or on a submodule) is a clear error that changes
    nothing: the outer window stays open and keeps its cache; closing it closes all."""
    model = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D))
    convert_model(model, recipe("fp8-delayed", convert=["*"]))
    inner = model[1]
    with step_window(model):
        model(_x(1)).sum().backward()
        cache = dict(inner._weight_cache)
        pending = {k: v.item() for k, v in inner.delayed_state.pending.items()}
        for target in (model, inner):
            with pytest.raises(RuntimeError, match="windows do not nest"), step_window(target):
                pass
        assert inner._window_open and list(inner._weight_cache) == list(cache)
        assert all(inner._weight_cache[k] is v for k, v in cache.items())
        assert {k: v.item() for k, v in inner.delayed_state.pending.items()} == pending
        assert len(pending) == 3  # nothing was committed
    assert not model[0]._window_open and not inner._window_open
    assert inner.delayed_state.trackers["input"].count == 0


def test_window_without_mx_layers_is_a_no_op():
    model = nn.Sequential(nn.Linear(D, D))
    with step_window(model):
        model(_x(1))
    bf16 = MXLinear(D, D, recipe=recipe("bf16"))
    with step_window(bf16):
        assert torch.equal(bf16(_x(1)), nn.functional.linear(_x(1), bf16.weight, bf16.bias))


def test_step_window_is_exported():
    assert mxfp8.step_window is step_window
    assert mxfp8.layers.step_window is step_window
    from mxfp8.layers import step_window as imported

    assert imported is step_window
