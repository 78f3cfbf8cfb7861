"""The operands and the explicit reference of the bit-exact layer tests
(``test_linear_exact.py``, ``test_wgrad_hp_and_tiles.py``, and the operand generators for
``test_rowwise_linear.py``): permutation and dense operands whose GEMMs are exact whatever the
accumulation order (see ``test_linear_exact.py``)."""

from __future__ import annotations

import torch

from mxfp8.layers.linear import MXLinear
from mxfp8.numerics.quantize import quantize

S = 64  # M = N = K, so permutation operands are square


def _perm(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(S, generator=g)
    vals = torch.exp2(torch.randint(-3, 4, (S,), generator=g).float())
    vals = vals * (torch.randint(0, 2, (S,), generator=g).float() * 2 - 1)
    p = torch.zeros(S, S)
    p[torch.arange(S), idx] = vals
    return p


def _dense(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-32, 5, (S, S), generator=g).float())
    # bf16-representable, so that the bf16 gradient autocast hands back is the same tensor
    return (torch.randn(S, S, generator=g) * mag).bfloat16().float()


def _q(t: torch.Tensor, fmt, dim: int, r) -> torch.Tensor:
    """Reference operand: MX-quantize the high-precision tensor along ``dim``; float64."""
    return quantize(t, fmt.elem(), block_size=r.block_size, dim=dim, scale_rule=r.scale_rule.value)


def _ref(x, w, dy, r, dt):
    """Explicit y, dx, dW from quantize along the documented axes (notes, section 4)."""
    d = torch.float64
    y = _q(x, r.fprop_input, -1, r).dequantize(d) @ _q(w, r.fprop_weight, -1, r).dequantize(d).T
    dx = _q(dy, r.dgrad_grad_output, -1, r).dequantize(d) @ _q(w, r.dgrad_weight, 0, r).dequantize(
        d
    )
    dw = _q(dy, r.wgrad_grad_output, 0, r).dequantize(d).T @ _q(x, r.wgrad_input, 0, r).dequantize(
        d
    )
    return y.to(dt), dx, dw


def _run(x, w, dy, r, autocast: bool, observer=None):
    """y, dx, dW of an S x S layer under recipe ``r`` (telemetry's ``observer`` if given)."""
    layer = MXLinear(S, S, bias=False, recipe=r)
    layer.observer = observer
    with torch.no_grad():
        layer.weight.copy_(w)
    xin = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(xin.view(2, S // 2, S))  # a leading batch dim: tokens = 2 * 32
    y.backward(dy.to(y.dtype).view(2, S // 2, S))
    return y.reshape(S, S), xin.grad, layer.weight.grad


CONFIGS = {
    # name: (x, w, dy) generators; the GEMMs that are exact in each, and what they test
    "dense-x-dy": (lambda: _dense(1), lambda: _perm(2), lambda: _dense(3)),  # x rows, dy rows
    "dense-w": (lambda: _perm(4), lambda: _dense(5), lambda: _perm(6)),  # W rows, W cols
    "dense-dy-cols": (lambda: _perm(7), lambda: _perm(8), lambda: _dense(9)),  # dy cols
    "dense-x-cols": (lambda: _dense(10), lambda: _perm(11), lambda: _perm(12)),  # x cols
}
# which outputs are exact (one non-zero product per element) in each configuration
EXACT = {
    "dense-x-dy": ("y", "dx"),
    "dense-w": ("y", "dx", "dw"),
    "dense-dy-cols": ("y", "dw"),
    "dense-x-cols": ("y", "dx", "dw"),
}
