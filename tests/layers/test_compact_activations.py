"""Activations saved as MX (``compact_call``): what is kept between forward and backward is
exactly the MX (E4M3, rceil, blocks of 32 along the last dim) of each compacted input, bit for
bit against the numpy reference quantizer; the forward output is the plain function's; the
gradients are torch's own autograd of the plain function at the dequantized inputs, and an
explicit formula at them for RMSNorm and SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mxfp8.layers.compact_activations import compact_call, compactable
from mxfp8.model.attention import sdpa
from mxfp8.model.transformer import rms_norm, swiglu
from mxfp8.numerics.formats import E4M3
from mxfp8.numerics.quantize import dequantize, quantize


def _ref_mx(x: torch.Tensor) -> torch.Tensor:
    """The MX of ``x`` by the numpy oracle, dequantized to x's dtype."""
    q = quantize(x.detach(), E4M3, block_size=32, dim=-1, scale_rule="rceil", kernel="reference")
    return dequantize(q, x.dtype)


def _saved(fn, args, compact, compiled=False):
    """Run compact_call under a saved-tensor hook: (output, what autograd kept)."""
    kept: list[torch.Tensor] = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compact_call(fn, *args, compact=compact, compiled=compiled)
    return out, kept


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _outlier_rows(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 300  # an outlier channel: blocks of very different scales
    x[..., 40:72] *= 1e-3
    return x.to(dtype)


@pytest.mark.parametrize("compiled", [False, True])
def test_rms_norm_keeps_the_mx_codes_and_gets_autograds_gradients_at_them(compiled):
    x = _leaf(_outlier_rows((3, 5, 64), torch.float32))
    w = torch.nn.Parameter(torch.rand(64) + 0.5)
    out, kept = _saved(rms_norm, (x, w, 1e-6), (True, False, False), compiled)
    # forward: the plain function, bit for bit
    assert torch.equal(out, rms_norm(x, w, 1e-6))
    # kept: FP8 codes, E8M0 scales and the weight itself (the parameter, not a copy)
    kinds = sorted(str(t.dtype) for t in kept)
    assert kinds == ["torch.float32", "torch.float8_e4m3fn", "torch.float8_e8m0fnu"], kinds
    codes = next(t for t in kept if t.dtype == torch.float8_e4m3fn)
    scales = next(t for t in kept if t.dtype == torch.float8_e8m0fnu)
    assert codes.shape == x.shape and scales.shape == (3, 5, 2)
    assert next(t for t in kept if t.dtype == torch.float32) is w
    want_q = quantize(x.detach(), E4M3, dim=-1, kernel="reference")
    assert torch.equal(codes.view(torch.uint8), want_q.data.view(torch.uint8))
    assert torch.equal(scales.view(torch.uint8), want_q.scale.view(torch.uint8))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    # torch's autograd of the plain function at the MX of x
    xq, wr = _leaf(_ref_mx(x)), _leaf(w.detach())
    rms_norm(xq, wr, 1e-6).backward(g)
    assert torch.equal(x.grad, xq.grad) and torch.equal(w.grad, wr.grad)
    # and an explicit formula: y = x r w, r = (mean x^2 + eps)^-1/2,
    # dx = r (g w - x r^2 mean(g w x)), dw = sum g x r
    xd, gd, wd = xq.detach().double(), g.double(), w.detach().double()
    r = (xd.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
    gw = gd * wd
    dx = r * (gw - xd * r.pow(2) * (gw * xd).mean(-1, keepdim=True))
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-5, atol=1e-7)  # |dx| ~ 3e-2
    torch.testing.assert_close(w.grad.double(), (gd * xd * r).sum((0, 1)), rtol=1e-4, atol=1e-7)
    # the gradient is really taken at the MX of x: not the full-precision one
    xf = _leaf(x.detach())
    rms_norm(xf, _leaf(w.detach()), 1e-6).backward(g)
    assert not torch.equal(xf.grad, x.grad)


def test_swiglu_in_bf16_against_an_explicit_derivative():
    a = _leaf(_outlier_rows((4, 96), torch.bfloat16, 2))
    b = _leaf(_outlier_rows((4, 96), torch.bfloat16, 3))
    out, kept = _saved(swiglu, (a, b), (True, True))
    assert torch.equal(out, swiglu(a, b))
    assert sum(t.numel() * t.element_size() for t in kept) == 2 * (4 * 96 + 4 * 3)
    g = torch.randn(4, 96, generator=torch.Generator().manual_seed(4)).bfloat16()
    out.backward(g)
    aq, bq = _leaf(_ref_mx(a)), _leaf(_ref_mx(b))
    swiglu(aq, bq).backward(g)
    assert torch.equal(a.grad, aq.grad) and torch.equal(b.grad, bq.grad)
    # d/da silu(a) b = b s (1 + a (1 - s)), d/db = silu(a): at the MX inputs, to bf16 rounding
    ad, bd, gd = aq.detach().double(), bq.detach().double(), g.double()
    s = torch.sigmoid(ad)
    torch.testing.assert_close(a.grad.double(), gd * bd * s * (1 + ad * (1 - s)), rtol=2e-2,
                               atol=1e-2)  # fmt: skip
    torch.testing.assert_close(b.grad.double(), gd * ad * s, rtol=2e-2, atol=1e-2)


def test_sdpa_with_gqa_gets_autograds_gradients_at_the_mx_inputs():
    g = torch.Generator().manual_seed(5)
    q = _leaf(torch.randn(2, 4, 32, 64, generator=g).bfloat16())
    k = _leaf(torch.randn(2, 2, 32, 64, generator=g).bfloat16())
    v = _leaf(torch.randn(2, 2, 32, 64, generator=g).bfloat16())
    out, kept = _saved(sdpa, (q, k, v, True, True), (True, True, True, False, False))
    assert torch.equal(out, sdpa(q, k, v, True, True))
    # nothing but the three inputs' codes and scales: no output, no softmax statistics
    assert (
        sorted(str(t.dtype) for t in kept)
        == ["torch.float8_e4m3fn"] * 3 + ["torch.float8_e8m0fnu"] * 3
    )
    dy = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(dy)
    ref = [_leaf(_ref_mx(t)) for t in (q, k, v)]
    sdpa(*ref, True, True).backward(dy)
    for got, want in zip((q, k, v), ref, strict=True):
        assert torch.equal(got.grad, want.grad)


def test_under_autocast_the_backward_replays_the_forwards_dtype():
    lin = torch.nn.Linear(64, 64, bias=False)
    x = _leaf(torch.randn(8, 64))

    def fn(t):  # a matmul: autocast decides its dtype
        return F.linear(t, lin.weight)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compact_call(fn, x, compact=(True,))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    xq = _leaf(_ref_mx(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fn(xq).float().sum().backward()
    assert torch.equal(x.grad, xq.grad)


def test_what_is_kept_whole_and_when_nothing_is_recorded():
    odd = _leaf(torch.randn(4, 40))  # 40 is not a multiple of 32: saved whole
    assert not compactable(odd) and compactable(torch.zeros(2, 64))
    out, kept = _saved(lambda t: t * t, (odd,), (True,))
    assert [t is odd for t in kept] == [True]
    out.sum().backward()
    assert torch.equal(odd.grad, 2 * odd.detach())
    # no grad: the plain call, nothing saved
    x = _leaf(torch.randn(4, 64))
    with torch.no_grad():
        out, kept = _saved(swiglu, (x, x), (True, True))
    assert kept == [] and not out.requires_grad
    with pytest.raises(ValueError, match="2 arguments"):
        compact_call(swiglu, x, x, compact=(True,))


def test_non_finite_inputs_come_back_non_finite():
    a = torch.randn(2, 64)
    a[0, 5] = float("inf")
    a = _leaf(a)
    out = compact_call(swiglu, a, _leaf(torch.ones(2, 64)), compact=(True, True))
    out.sum().backward()
    # the block that held an Inf comes back NaN, as its MX dequantizes; the others are finite
    assert a.grad[0, :32].isnan().all()
    assert a.grad[0, 32:].isfinite().all() and a.grad[1].isfinite().all()
