"""The layer's compiled fast path (shared row+column quantization of x and dy) changes no bit.

MXLinear with ``compile_quantize=True`` quantizes x (along K and along M) and dy (along N and
along M) with :func:`mxfp8.numerics.rowcol.fake_quantize_rowcol`. Its outputs and gradients
must equal, bit for bit, the eager layer (``compile_quantize=False``), which
test_linear_exact.py checks against an explicit computation from ``quantize``. The data span
2^-30..2^4, so row and column blocks get different scales: a copy quantized along the wrong
axis would differ.
"""

from __future__ import annotations

import pytest
import torch

from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe
from mxfp8.layers.step import step_window

M, K, N = 64, 64, 64  # one shape for x and dy: one compile of the shared kernel


def _wide(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-30, 5, shape, generator=g).float())
    return torch.randn(shape, generator=g) * mag


def _run(name: str, compiled: bool, autocast: bool, two_forwards: bool = False, kernel=None):
    layer = MXLinear(K, N, bias=True, recipe=recipe(name), compile_quantize=compiled,
                     quantize_kernel=kernel)  # fmt: skip
    with torch.no_grad():
        layer.weight.copy_(_wide((N, K), 1))
        layer.bias.copy_(_wide((N,), 6))
    xs = [_wide((M, K), s).requires_grad_(True) for s in (2, 3)]
    dys = [_wide((M, N), s) for s in (4, 5)]
    # in a step window, as training runs it: the weight's two copies come from the shared
    # kernel too (outside a window each GEMM quantizes the weight on its own, uncached)
    with step_window(layer):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if two_forwards:  # the saved wgrad copy of x must not live in a reused buffer
                ys = [layer(x) for x in xs]
            else:
                ys = [layer(xs[0])]
        sum((y * dy.to(y.dtype)).sum() for y, dy in zip(ys, dys, strict=False)).backward()
    return [y.detach() for y in ys] + [x.grad for x in xs[: len(ys)]] + [layer.weight.grad]


@pytest.fixture
def pair_calls(monkeypatch):
    """Records, for each shared row+column quantization tried, whether a shared kernel ran
    (``rowcol._shared``): dy's two operands, the weight's two copies, x's operand plus its
    stored wgrad copy."""
    from mxfp8.numerics import rowcol

    calls = []
    orig = rowcol._shared

    def counting(*args, **kwargs):
        res = orig(*args, **kwargs)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(rowcol, "_shared", counting)
    return calls


@pytest.mark.parametrize(
    "autocast",
    [True, pytest.param(False, marks=pytest.mark.slow)],  # fp32 compiles a second kernel
    ids=["bf16-autocast", "fp32"],
)
def test_compiled_pair_path_bit_identical(pair_calls, autocast):
    eager = _run("mxfp8", compiled=False, autocast=autocast)
    n_eager = len(pair_calls)
    fast = _run("mxfp8", compiled=True, autocast=autocast)
    assert pair_calls[n_eager:] == [True, True, True]  # x and W in forward, dy in backward
    for a, b in zip(eager, fast, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_compiled_pair_path_two_forwards_before_backward(pair_calls):
    eager = _run("mxfp8", compiled=False, autocast=True, two_forwards=True)
    fast = _run("mxfp8", compiled=True, autocast=True, two_forwards=True)
    assert any(pair_calls)
    for a, b in zip(eager, fast, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mxfp8-floor", "mxfp8-e5m2-grads"])
def test_compiled_pair_path_other_recipes(name):
    eager = _run(name, compiled=False, autocast=True)
    fast = _run(name, compiled=True, autocast=True)
    for a, b in zip(eager, fast, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_compiled_weight_pair_cached_across_micro_batches():
    """Inside a step window, both weight copies come from one shared pass at the first
    forward, are reused by every micro-batch, and are remade in the next window after a
    write (even one through ``.data``, which bumps no version counter)."""
    fast = MXLinear(K, N, bias=False, compile_quantize=True)
    ref = MXLinear(K, N, bias=False)
    ref.cache_weights = False
    with torch.no_grad():
        fast.weight.copy_(_wide((N, K), 7))
        ref.weight.copy_(fast.weight)
    with step_window(fast):
        for micro in range(2):
            grads = []
            for layer in (fast, ref):
                x = _wide((M, K), 10 + micro).requires_grad_(True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = layer(x)
                y.backward(_wide((M, N), 20 + micro).to(y.dtype))
                grads.append((y.detach(), x.grad))
            for a, b in zip(*grads, strict=True):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(fast.weight.grad, ref.weight.grad)
    assert fast.weight_quantizations == 2  # W along K and W^T along N, once for the step
    fast.weight.data.mul_(2)
    ref.weight.data.mul_(2)
    x = _wide((M, K), 30)
    with step_window(fast), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)  # x needs no gradient: only the fprop copy is made, not the dgrad one
    assert fast.weight_quantizations == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(y.view(torch.uint8), ref(x).view(torch.uint8))


@pytest.mark.parametrize(
    "kernel",
    [
        # the CUDA default (Inductor's fused kernel), run here on CPU tensors
        "inductor",
        "triton",  # a dev extra: tests/test_dev_extras.py fails without it
    ],
)
def test_layer_with_a_chosen_kernel_bit_identical(pair_calls, kernel):
    """``quantize_kernel`` changes which kernel quantizes, never a bit: outputs and gradients
    equal the eager layer's. Triton makes both copies of x, W and dy from one read each (the
    shared path runs); Inductor makes each copy with its own call."""
    eager = _run("mxfp8", compiled=False, autocast=True)
    n_eager = len(pair_calls)
    chosen = _run("mxfp8", compiled=False, autocast=True, kernel=kernel)
    shared = pair_calls[n_eager:]
    # Inductor: only x's operand + stored copy goes through the two-copy entry (which then
    # makes two calls); W and dy are quantized copy by copy
    assert shared == ([True, True, True] if kernel == "triton" else [False])
    for a, b in zip(eager, chosen, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_unknown_quantize_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel 'tritn'.*'triton'"):
        MXLinear(K, N, quantize_kernel="tritn")
