"""MXLinear equals, bit for bit, an explicit computation from ``mxfp8.quantize``.

How the accumulation order is taken out of the comparison: in each configuration, one operand
of the GEMM under test is a signed, power-of-two-scaled permutation matrix (one non-zero per
row and column). Its quantization is exact along any axis (a block holding one power of two
represents it exactly, for both formats and both rules), and every output element is a single
product of two MX values plus exact zeros: at most 8 significant bits, exact in bf16 and fp32
whatever the summation order. The other operand is dense, with magnitudes spread over
2^-32..2^4 (wider than E5M2's 31 octaves) so that blocks along rows and along columns have
different scales (subnormal rounding, and saturation under the floor rule): quantizing along
the wrong axis changes the result, which a test checks too, so this cannot pass vacuously.
The reference is quantize(...) along the documented axis, dequantize, matmul in float64
(exact), cast to the output dtype (exact).
"""

from __future__ import annotations

import pytest
import torch
from linear_exact_helpers import CONFIGS, EXACT, S, _perm, _q, _ref, _run

from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe
from mxfp8.numerics.quantize import quantize

MX_RECIPES = ["mxfp8", "mxfp8-floor", "mxfp8-e5m2-grads"]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", MX_RECIPES)
def test_three_gemms_bit_exact(name, config, autocast):
    r = recipe(name, convert=("*",))
    x, w, dy = (f() for f in CONFIGS[config])
    dt = torch.bfloat16 if autocast else torch.float32
    y, dx, dw = _run(x, w, dy, r, autocast)
    ry, rdx, rdw = _ref(x, w, dy, r, dt)
    assert y.dtype == dt and dx.dtype == torch.float32 and dw.dtype == torch.float32
    got = {"y": (y, ry), "dx": (dx, rdx.to(dt).float()), "dw": (dw, rdw.to(dt).float())}
    for key in EXACT[config]:
        a, b = got[key]
        assert torch.equal(a, b.to(a.dtype)), f"{key} differs from the explicit computation"


def _wrong_axis(x, w, dy, r):
    """The same computation with every operand quantized along the other axis."""
    d = torch.float64
    y = _q(x, r.fprop_input, 0, r).dequantize(d) @ _q(w, r.fprop_weight, 0, r).dequantize(d).T
    dx = _q(dy, r.dgrad_grad_output, 0, r).dequantize(d) @ _q(w, r.dgrad_weight, -1, r).dequantize(
        d
    )
    dw = _q(dy, r.wgrad_grad_output, -1, r).dequantize(d).T @ _q(
        x, r.wgrad_input, -1, r
    ).dequantize(d)
    return y, dx, dw


@pytest.mark.parametrize("name", MX_RECIPES)
def test_axes_matter_for_this_data(name):
    """Guard against a vacuous pass: in every configuration, the output that exercises the
    dense operand changes when that operand is quantized along the other axis."""
    r = recipe(name)
    tested = {
        "dense-x-dy": ("y", "dx"),
        "dense-w": ("y", "dx"),
        "dense-dy-cols": ("dw",),
        "dense-x-cols": ("dw",),
    }
    for config, keys in tested.items():
        x, w, dy = (f() for f in CONFIGS[config])
        right = dict(zip(("y", "dx", "dw"), _ref(x, w, dy, r, torch.float64), strict=True))
        wrong = dict(zip(("y", "dx", "dw"), _wrong_axis(x, w, dy, r), strict=True))
        for key in keys:
            assert not torch.equal(right[key], wrong[key]), (config, key)


def test_column_copies_come_from_high_precision():
    """wgrad's x operand (blocks along tokens) is quantized from x itself, not from the
    row-quantized x (transposed as is, or re-quantized along columns)."""
    r = recipe("mxfp8")
    x, w, dy = (f() for f in CONFIGS["dense-x-cols"])  # dy a permutation: dW exposes x's copy
    _, _, dw = _run(x, w, dy, r, autocast=False)
    d = torch.float64
    dyq = _q(dy, r.wgrad_grad_output, 0, r).dequantize(d)
    from_hp = dyq.T @ _q(x, r.wgrad_input, 0, r).dequantize(d)
    rows = _q(x, r.fprop_input, -1, r).dequantize(torch.float32)
    transposed_rows = dyq.T @ rows.double()
    double_quantized = dyq.T @ _q(rows, r.wgrad_input, 0, r).dequantize(d)
    assert torch.equal(dw, from_hp.float())
    assert not torch.equal(dw, transposed_rows.float())
    assert not torch.equal(dw, double_quantized.float())
    # same for dgrad's W operand (blocks along N), with configuration dense-w
    x, w, dy = (f() for f in CONFIGS["dense-w"])
    _, dx, _ = _run(x, w, dy, r, autocast=False)
    dyq = _q(dy, r.dgrad_grad_output, -1, r).dequantize(d)
    w_rows = _q(w, r.fprop_weight, -1, r).dequantize(torch.float32)
    assert torch.equal(dx, (dyq @ _q(w, r.dgrad_weight, 0, r).dequantize(d)).float())
    assert not torch.equal(dx, (dyq @ w_rows.double()).float())
    assert not torch.equal(dx, (dyq @ _q(w_rows, r.dgrad_weight, 0, r).dequantize(d)).float())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_bias_added_in_high_precision_after_the_gemm(autocast):
    """y = GEMM(quantized x, quantized W) + bias, the bias in the output dtype, never
    quantized. x and W are permutations (configuration dense-w's x), so each GEMM output is
    one power of two in 2^-6..2^6; the bias has 12 significant bits in [128, 256): off the
    FP8 grid and off bf16's, and large next to the GEMM outputs, so an FP8 bias (folded
    into the GEMM's operands) or a bias added in bf16 to an fp32 output changes y. In fp32
    the sum is exact, so y - y_without_bias is the bias itself, bit for bit."""
    r = recipe("mxfp8", convert=("*",))
    dt = torch.bfloat16 if autocast else torch.float32
    g = torch.Generator().manual_seed(3)
    bias = (2048 + torch.randint(0, 1024, (S,), generator=g) * 2 + 1).float() / 16
    x, w = _perm(4), _perm(5)
    with_bias = MXLinear(S, S, bias=True, recipe=r)
    no_bias = MXLinear(S, S, bias=False, recipe=r)
    with torch.no_grad():
        with_bias.weight.copy_(w)
        no_bias.weight.copy_(w)
        with_bias.bias.copy_(bias)
    # dy in {-1/2, 0, 1/2}: sums over the 64 tokens fit in 8 bits, exact even in bf16
    dy = (torch.randint(-1, 2, (2, S // 2, S), generator=g).float() / 2).to(dt)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = with_bias(x.view(2, S // 2, S))
        y0 = no_bias(x.view(2, S // 2, S))
    assert y.dtype == y0.dtype == dt
    assert torch.equal(y, y0 + bias.to(dt))  # one rounding, in the output dtype
    if not autocast:
        assert torch.equal(y - y0, bias.expand_as(y))  # exact: the bias itself
        assert not torch.equal(bias.bfloat16().float(), bias)  # a bf16 add would show
    fp8_bias = quantize(bias, r.fprop_weight.elem(), block_size=r.block_size).dequantize()
    assert not torch.equal(y, y0 + fp8_bias.to(dt))  # a quantized bias would show
    y.backward(dy)
    assert torch.equal(with_bias.bias.grad, dy.float().sum((0, 1)))  # exact: dy.sum(tokens)
    assert torch.equal(with_bias.weight.grad, _grad_w(no_bias, x, dy, autocast))


def _grad_w(layer, x, dy, autocast):
    """dW of ``layer`` for the same x and dy: the bias must not change the GEMMs."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x.view(2, S // 2, S))
    y.backward(dy)
    return layer.weight.grad
