"""Per-row FP8 linear (``fp8-rowwise``, ``fp8-rowwise-gw-hp``): one fp32 scale per row.

Each operand of each GEMM is quantized from its high-precision tensor with one current scale
per slice along that GEMM's reduction dim (:func:`mxfp8.numerics.rowwise.quantize_rowwise`),
so a scale belongs to one row or column of the output:

- fprop  y = x W^T: x [M, K] along K (``dim=1``), W [N, K] along K (``dim=1``);
- dgrad dx = dy W:  dy [M, N] along N (``dim=1``), W [N, K] along N (``dim=0``);
- wgrad dW = dy^T x: dy [M, N] along M (``dim=0``), x [M, K] along M (``dim=0``).

A row-scaled copy is not a column-scaled one, so W, x and dy are each quantized twice, every
copy from the high-precision tensor (never from another quantized copy). The fprop copies
and the wgrad copy of x are made in forward (the latter kept for backward: FP8 codes plus
one fp32 scale per column); the dgrad copy of W and both copies of dy in backward. A GEMM
named in ``recipe.hp_gemms`` (``("wgrad",)`` for ``fp8-rowwise-gw-hp``) multiplies the
unquantized operands in the compute dtype instead (x then is kept in the compute dtype),
and its operands are neither quantized nor observed.

The emulated GEMM dequantizes both operands in fp32 (``codes / scale``, one rounding each)
and multiplies them in fp32 (fp32 accumulation), then casts the product to the compute dtype
once. The FP8 x FP8 products of hardware row-wise GEMMs (``torch._scaled_mm`` with row-wise
scales) are exact and the scales are applied to the fp32 sum, so this matches them up to the
order of accumulation and one fp32 rounding of each dequantized operand.

Weight copies are cached inside a step window as the other recipes' are (see
:func:`weight_operand`): two per window (along K and along N), or two per forward and
backward outside one.
"""

from __future__ import annotations

import torch

from mxfp8.layers.recipe import Recipe
from mxfp8.numerics.rowwise import RowwiseFP8, quantize_rowwise


def _mm(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """a @ b of two dequantized fp32 operands: fp32 accumulation, one cast to ``dt``."""
    return torch.mm(a, b).to(dt)


def _quantize(recipe: Recipe, t: torch.Tensor, gemm: str, operand: str, dim: int) -> RowwiseFP8:
    return quantize_rowwise(t, recipe.fmt(gemm, operand).elem(), dim)


def weight_operand(layer, weight: torch.Tensor, gemm: str) -> RowwiseFP8:
    """W quantized for ``gemm``: along K for fprop (``dim=1``), along N for dgrad (``dim=0``).

    Fresh from ``weight`` at every call, except inside a step window
    (:func:`mxfp8.layers.step_window`) with more than one forward, where the weight cannot
    change: there each copy is made once and reused (keyed on the version counter and
    storage, a guard against a replaced parameter). An observer or ``cache_weights = False``
    bypasses the cache. ``layer.weight_quantizations`` counts every copy made.
    """
    dim = 1 if gemm == "fprop" else 0
    with torch.no_grad():
        caching = (layer._window_open and layer._window_reuse and layer.cache_weights
                   and layer.observing() is None)  # fmt: skip
        if not caching:
            layer.weight_quantizations += 1
            return _quantize(layer.recipe, weight.detach(), gemm, "weight", dim)
        key = ("rowwise", gemm, weight._version, weight.data_ptr())
        cache = layer._weight_cache
        q = cache.get(key)
        if q is None:
            for old in [k for k in cache if k[:2] == ("rowwise", gemm)]:
                del cache[old]  # one entry per GEMM: a stale version goes
            q = cache[key] = _quantize(layer.recipe, weight.detach(), gemm, "weight", dim)
            layer.weight_quantizations += 1
        return q


def _fprop(x2d: torch.Tensor, weight: torch.Tensor, dt: torch.dtype, layer, obs) -> torch.Tensor:
    """y = x W^T [M, N], quantized or (``hp_gemms``) not; observes the fprop operands."""
    r: Recipe = layer.recipe
    if "fprop" in r.hp_gemms:
        return torch.mm(x2d.to(dt), weight.to(dt).t())
    qx = _quantize(r, x2d, "fprop", "input", 1)
    qw = weight_operand(layer, weight, "fprop")
    if obs is not None:
        obs(layer, "fprop", "input", x2d, qx)
        obs(layer, "fprop", "weight", weight, qw)
    return _mm(qx.dequantize(), qw.dequantize().t(), dt)


def rowwise_forward(x2d: torch.Tensor, weight: torch.Tensor, dt: torch.dtype, layer):
    """The layer's y2d: through :class:`RowwiseLinearFunction` when a gradient is needed,
    else the forward GEMM alone (no wgrad copy of x, nothing kept)."""
    if torch.is_grad_enabled() and (x2d.requires_grad or weight.requires_grad):
        return RowwiseLinearFunction.apply(x2d, weight, dt, layer)
    return _fprop(x2d, weight, dt, layer, layer.observing())


class RowwiseLinearFunction(torch.autograd.Function):
    """forward(x2d [M, K], weight [N, K], dt, layer) -> y [M, N] in ``dt`` (per-row FP8)."""

    @staticmethod
    def forward(ctx, x2d, weight, dt, layer):  # type: ignore[override]
        r: Recipe = layer.recipe
        obs = layer.observing()
        y = _fprop(x2d, weight, dt, layer, obs)
        saved: tuple[torch.Tensor, ...] = ()
        ctx.x_meta = None
        if ctx.needs_input_grad[1]:
            if "wgrad" in r.hp_gemms:
                saved, ctx.x_meta = (x2d.to(dt),), "hp"
            else:  # x along M, from the high-precision x: codes + one scale per column
                qxt = _quantize(r, x2d, "wgrad", "input", 0)
                if obs is not None:
                    obs(layer, "wgrad", "input", x2d, qxt)
                saved, ctx.x_meta = (qxt.data, qxt.scale), "fp8"
        ctx.save_for_backward(weight, *saved)
        ctx.layer, ctx.dt = layer, dt
        ctx.x_dtype = x2d.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        layer, dt = ctx.layer, ctx.dt
        r: Recipe = layer.recipe
        weight, *saved = ctx.saved_tensors
        obs = layer.observer
        dy = dy.reshape(-1, dy.shape[-1]).to(dt)  # [M, N]
        dx = dw = None
        if ctx.needs_input_grad[0] and "dgrad" in r.hp_gemms:
            dx = torch.mm(dy, weight.to(dt)).to(ctx.x_dtype)
        elif ctx.needs_input_grad[0]:  # dy along N, W along N
            qdy = _quantize(r, dy, "dgrad", "grad_output", 1)
            qw = weight_operand(layer, weight, "dgrad")
            if obs is not None:
                obs(layer, "dgrad", "grad_output", dy, qdy)
                obs(layer, "dgrad", "weight", weight, qw)
            dx = _mm(qdy.dequantize(), qw.dequantize(), dt).to(ctx.x_dtype)  # [M, K]
        if ctx.needs_input_grad[1] and ctx.x_meta == "hp":
            dw = torch.mm(dy.t(), saved[0]).to(weight.dtype)
        elif ctx.needs_input_grad[1]:  # dy along M, x along M
            qdyt = _quantize(r, dy, "wgrad", "grad_output", 0)
            if obs is not None:
                obs(layer, "wgrad", "grad_output", dy, qdyt)
            xdata, xscale = saved
            xt = xdata.float() / xscale  # RowwiseFP8.dequantize, from the kept codes
            dw = _mm(qdyt.dequantize().t(), xt, dt).to(weight.dtype)  # [N, K]
        return dx, dw, None, None
