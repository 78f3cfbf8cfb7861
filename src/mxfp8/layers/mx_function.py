"""The autograd Function of an MX linear layer: three GEMMs, six quantized operands.

y = x W^T with x [M, K] (M tokens), W [N, K]. Each GEMM's operands are quantized along that
GEMM's reduction dimension, each from the high-precision tensor (reference notes, section 4):

| GEMM  | product        | reduction | operands (NT form: a [.., R] @ b [.., R]^T, R reduced) |
|-------|----------------|-----------|--------------------------------------------------------|
| fprop | y  = x W^T     | K         | a = x [M, K],      b = W [N, K]                        |
| dgrad | dx = dy W      | N         | a = dy [M, N],     b = W^T [K, N] (W along its dim 0)  |
| wgrad | dW = dy^T x    | M         | a = dy^T [N, M],   b = x^T [K, M] (both along dim 0)   |

Why the column-wise copies come from high precision: an MX block is a run of 32 elements
along one axis with one shared scale; transposing a row-quantized tensor gives blocks along
the wrong axis, and re-quantizing it would round twice. So x, W and dy are each quantized
twice, once per axis, always from the original values.

The wgrad copy of x is made in the forward (while x is hot in cache) and saved instead of x.
The weight's two copies are cached only inside a step window (:func:`weight_operand`,
:mod:`mxfp8.layers.step`); outside one, each call quantizes the weight fresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mxfp8.layers.gemm import EmulatedBackend, MXSpec, ScaledMMBackend


@dataclass(frozen=True, eq=False)
class MXPlan:
    """Everything one call needs, fixed per (layer, device, compute dtype)."""

    specs: dict[tuple[str, str], MXSpec]  # (gemm, operand) -> how to quantize it
    backend: EmulatedBackend | ScaledMMBackend
    compute_dtype: torch.dtype  # dtype of the GEMM outputs (bf16 under autocast)


def _pack(op: Any) -> tuple[torch.Tensor, ...]:
    """A backend operand as tensors that ``save_for_backward`` can hold."""
    return (op,) if isinstance(op, torch.Tensor) else (op.data, op.scale)


def _unpack(saved: tuple[torch.Tensor, ...], like: Any) -> Any:
    if len(saved) == 1:
        return saved[0]
    import dataclasses

    return dataclasses.replace(like, data=saved[0], scale=saved[1])


class MXLinearFunction(torch.autograd.Function):
    """forward(x2d [M, K], weight [N, K], plan, layer) -> y [M, N] in plan.compute_dtype.

    ``layer`` (the MXLinear, or None under torch.compile) provides the weight-operand cache
    and the telemetry observer.
    """

    @staticmethod
    def forward(ctx, x2d, weight, plan: MXPlan, layer):  # type: ignore[override]
        be, dt = plan.backend, plan.compute_dtype
        obs = None if layer is None else layer.observer
        want = obs is not None
        spec, spec_t = plan.specs["fprop", "input"], plan.specs["wgrad", "input"]
        x_buf = scratch(layer, "x", x2d, dt)  # the operand dtype (x may be fp32 under autocast)
        # both copies of x (along K for fprop; x^T [K, M] along M for wgrad) in shared passes
        pair = None if want else be.quantize_pair(x2d, spec, spec_t, dt, out_row=x_buf)
        if pair is not None:
            (xq, xtq), qx, qxt = pair, None, None
        else:
            xq, qx = be.quantize_mx(x2d, spec, dt, want_q=want, out=x_buf)
        wq, qw = weight_operand(layer, weight, plan, "fprop")
        y = be.mm_nt(xq, wq, dt)  # [M, N]
        if pair is None:
            # wgrad operand: x^T [K, M], blocks along M (tokens), from the high-precision x
            xtq, qxt = be.quantize_mx(x2d.t(), spec_t, dt, want_q=want)
        if obs is not None:
            obs(layer, "fprop", "input", x2d, qx)
            obs(layer, "fprop", "weight", weight, qw)
            obs(layer, "wgrad", "input", x2d, qxt)
        packed = _pack(xtq)
        ctx.xt_like = None if len(packed) == 1 else xtq
        ctx.save_for_backward(weight, *packed)
        ctx.plan, ctx.layer = plan, layer
        ctx.x_dtype = x2d.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        plan, layer = ctx.plan, ctx.layer
        be, dt = plan.backend, plan.compute_dtype
        weight, *packed = ctx.saved_tensors
        obs = None if layer is None else layer.observer
        want = obs is not None
        dy = dy.reshape(-1, dy.shape[-1]).to(dt)  # [M, N]
        dx = dw = None
        spec, spec_t = plan.specs["dgrad", "grad_output"], plan.specs["wgrad", "grad_output"]
        pair = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and not want:
            # both copies of dy (along N for dgrad, dy^T along M for wgrad) in shared passes
            bufs = dict(out_row=scratch(layer, "dy", dy), out_col=scratch(layer, "dyT", dy))
            pair = be.quantize_pair(dy, spec, spec_t, dt, **bufs)
        if ctx.needs_input_grad[0]:
            if pair is not None:
                dyq, qdy = pair[0], None
            else:
                dyq, qdy = be.quantize_mx(dy, spec, dt, want_q=want, out=scratch(layer, "dy", dy))
            wtq, qwt = weight_operand(layer, weight, plan, "dgrad")
            dx = be.mm_nt(dyq, wtq, dt).to(ctx.x_dtype)  # [M, N] x [N, K] -> [M, K]
            if obs is not None:
                obs(layer, "dgrad", "grad_output", dy, qdy)
                obs(layer, "dgrad", "weight", weight, qwt)
        if ctx.needs_input_grad[1]:
            # dy^T [N, M], blocks along M, from the high-precision dy
            if pair is not None:
                dytq, qdyt = pair[1], None
            else:
                buf = scratch(layer, "dyT", dy)  # the source dy's shape: blocks along its dim 0
                dytq, qdyt = be.quantize_mx(dy.t(), spec_t, dt, want_q=want, out=buf)
            xtq = _unpack(tuple(packed), ctx.xt_like)
            dw = be.mm_nt(dytq, xtq, dt).to(weight.dtype)  # [N, M] x [M, K] -> [N, K]
            if obs is not None:
                obs(layer, "wgrad", "grad_output", dy, qdyt)
        return dx, dw, None, None


def scratch(layer, key: str, like: torch.Tensor, dtype=None) -> torch.Tensor | None:
    """A per-layer buffer shaped like ``like`` (of ``dtype``, default like's) for an operand
    consumed within the same call.

    Only operands that die before the call returns use it (x for fprop, dy's two copies in
    backward); the saved wgrad copy of x never does, so two forwards before one backward
    stay correct. Off under torch.compile and when ``layer.reuse_buffers`` is False.
    """
    if layer is None or not layer.reuse_buffers:
        return None
    buf = layer._scratch.get(key)
    if (
        buf is None
        or buf.shape != like.shape
        or buf.dtype != (dtype or like.dtype)
        or buf.device != like.device
    ):
        buf = layer._scratch[key] = torch.empty_like(
            like, dtype=dtype or like.dtype, memory_format=torch.contiguous_format
        )
    return buf


def weight_operand(layer, weight: torch.Tensor, plan: MXPlan, gemm: str) -> tuple[Any, Any]:
    """The quantized weight for ``gemm`` ("fprop": W along K, "dgrad": W^T along N).

    Quantized fresh from ``weight`` at every call, except inside a step window
    (:func:`mxfp8.layers.step_window`, open while ``layer._window_open``): the training loop
    opens one around the micro-batches of each optimizer step, when the weight cannot change,
    so they quantize it once and share the copies. Nothing outside a window can go stale: no
    signal catches every write (``p.data.mul_`` bumps neither the version counter nor the
    storage pointer), so outside a window there is no cache to invalidate. Inside one, the key
    still holds the version counter and storage pointer, a guard against a parameter replaced
    or updated in place (by tracked ops) mid-window. With an observer attached, or
    ``layer.cache_weights`` False, the cache is bypassed (telemetry sees a fresh MXTensor).
    ``layer.weight_quantizations`` counts every copy made; ``layer`` is None under
    torch.compile, which bypasses the cache and counts nothing.
    """
    hp = weight if gemm == "fprop" else weight.t()
    spec = plan.specs[gemm, "weight"]
    if layer is None:
        return plan.backend.quantize_mx(hp, spec, plan.compute_dtype)
    if not (layer._window_open and layer.observer is None and layer.cache_weights):
        layer.weight_quantizations += 1
        want = layer.observer is not None
        return plan.backend.quantize_mx(hp, spec, plan.compute_dtype, want_q=want)
    key = (gemm, weight._version, weight.data_ptr(), plan.compute_dtype, plan.backend.name)
    cache = layer._weight_cache
    if key not in cache:
        pair = None
        if gemm == "fprop":  # both copies of W in shared passes; the dgrad one is cached too
            with torch.no_grad():
                spec_t = plan.specs["dgrad", "weight"]
                pair = plan.backend.quantize_pair(weight, spec, spec_t, plan.compute_dtype)
        for g in ("fprop", "dgrad") if pair is not None else (gemm,):
            for old in [k for k in cache if k[0] == g]:
                del cache[old]  # one entry per GEMM: stale versions go
        if pair is not None:
            cache[key] = (pair[0], None)
            cache[("dgrad", *key[1:])] = (pair[1], None)
            layer.weight_quantizations += 2
        else:
            with torch.no_grad():
                cache[key] = plan.backend.quantize_mx(hp, spec, plan.compute_dtype)
            layer.weight_quantizations += 1
    return cache[key]
