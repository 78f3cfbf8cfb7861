"""Per-tensor FP8 linear (current or delayed scaling): the classic Hopper-era recipes.

One fp32 scale per tensor, so a transposed quantized tensor is still correctly quantized:
x, W and dy are each quantized once and used (transposed where needed) in both GEMMs that
read them. The emulated GEMM multiplies the FP8 values (exact in bf16) with fp32
accumulation, then applies ``1 / (scale_a * scale_b)`` in fp32, as ``_scaled_mm`` does. For a
bf16 output the matmul result is rounded to bf16 before that rescale (one extra rounding, at
most half a bf16 ulp): the CPU has no bf16 x bf16 -> fp32 matmul, and these recipes are
baselines, not the subject of bit-exact tests.

Delayed scaling: each layer holds one amax tracker per tensor (input, weight, grad_output).
Within an optimizer step every call uses the scale from the history; the step's observed
amax (the max over its micro-batches) is appended to the history when the layer first runs
after the weight changed (i.e. after ``optimizer.step()``). So the history advances exactly
once per optimizer step, deterministically, without the training loop calling anything.
"""

from __future__ import annotations

from typing import Any

import torch

from mxfp8.layers.recipe import Recipe, ScalingKind

OPERANDS = ("input", "weight", "grad_output")


class DelayedState:
    """Amax trackers of one layer plus the amaxes seen during the current step."""

    def __init__(self, recipe: Recipe) -> None:
        from mxfp8.numerics.tensorwise import DelayedScaling

        fmts = {
            "input": recipe.fprop_input,
            "weight": recipe.fprop_weight,
            "grad_output": recipe.dgrad_grad_output,
        }
        self.trackers = {
            op: DelayedScaling(
                fmts[op].elem(),
                history_len=recipe.history_len,
                reduce=recipe.amax_reduce.value,
                ema_decay=recipe.ema_decay,
            )
            for op in OPERANDS
        }
        self.pending: dict[str, torch.Tensor] = {}
        self.seen_version: tuple[int, int] | None = None

    def begin_call(self, weight: torch.Tensor, recording: bool) -> None:
        """Commit the last step's amaxes if the weight changed since the previous call."""
        version = (weight._version, weight.data_ptr())
        if recording and version != self.seen_version:
            self.commit()
            self.seen_version = version

    def commit(self) -> None:
        for op in OPERANDS:  # fixed order: deterministic
            if op in self.pending:
                self.trackers[op].update(self.pending.pop(op))

    def scale(self, operand: str) -> torch.Tensor | None:
        """The delayed scale, or None (current scaling) before any history exists."""
        tracker = self.trackers[operand]
        return None if tracker.count == 0 else tracker.scale()

    def record(self, operand: str, amax: torch.Tensor) -> None:
        amax = amax.detach().float().cpu()
        prev = self.pending.get(operand)
        self.pending[operand] = amax if prev is None else torch.maximum(prev, amax)

    def state_dict(self) -> dict[str, Any]:
        return {
            "trackers": {op: t.state_dict() for op, t in self.trackers.items()},
            "pending": {op: a.clone() for op, a in self.pending.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for op, s in state["trackers"].items():
            self.trackers[op].load_state_dict(s)
        self.pending = {op: a.clone() for op, a in state["pending"].items()}
        self.seen_version = None  # the next training call commits the restored pending amaxes


def quantize_operand(layer, x: torch.Tensor, operand: str, recording: bool):
    """Quantize a whole tensor with the layer's recipe (current or delayed scale)."""
    from mxfp8.numerics.tensorwise import quantize_tensorwise

    recipe: Recipe = layer.recipe
    fmt = {
        "input": recipe.fprop_input,
        "weight": recipe.fprop_weight,
        "grad_output": recipe.dgrad_grad_output,
    }[operand].elem()
    if recipe.scaling is ScalingKind.DELAYED:
        state: DelayedState = layer.delayed_state
        q = quantize_tensorwise(x, fmt, state.scale(operand))
        if recording:
            state.record(operand, q.amax)
        return q
    return quantize_tensorwise(x, fmt)


def _mm_nt(a: torch.Tensor, sa, b: torch.Tensor, sb, dt: torch.dtype) -> torch.Tensor:
    """(a / sa) @ (b / sb)^T for FP8 a [M, R], b [N, R]; fp32 accumulation."""
    mm_dtype = torch.bfloat16 if dt == torch.bfloat16 else torch.float32
    out = torch.mm(a.to(mm_dtype), b.to(mm_dtype).t())
    inv = sa.reciprocal() * sb.reciprocal()  # two factors: sa * sb could overflow fp32
    return (out.float() * inv.to(out.device)).to(dt)


class TensorwiseLinearFunction(torch.autograd.Function):
    """forward(x2d [M, K], weight [N, K], dt, layer, recording) -> y [M, N] (per-tensor FP8).

    ``recording``: whether this call's amaxes feed the delayed-scaling history (training only).
    """

    @staticmethod
    def forward(ctx, x2d, weight, dt, layer, recording):  # type: ignore[override]
        qx = quantize_operand(layer, x2d, "input", recording)
        qw = weight_operand(layer, weight, recording)
        y = _mm_nt(qx.data, qx.scale, qw.data, qw.scale, dt)
        obs = layer.observer
        if obs is not None:
            obs(layer, "fprop", "input", x2d, qx)
            obs(layer, "fprop", "weight", weight, qw)
            obs(layer, "wgrad", "input", x2d, qx)
            obs(layer, "dgrad", "weight", weight, qw)
        ctx.save_for_backward(qx.data, qx.scale, qw.data, qw.scale)
        ctx.layer, ctx.dt, ctx.recording = layer, dt, recording
        ctx.x_dtype, ctx.w_dtype = x2d.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        layer, dt = ctx.layer, ctx.dt
        xd, xs, wd, ws = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1]).to(dt)  # [M, N]
        qdy = quantize_operand(layer, dy, "grad_output", ctx.recording)
        if layer.observer is not None:
            layer.observer(layer, "dgrad", "grad_output", dy, qdy)
            layer.observer(layer, "wgrad", "grad_output", dy, qdy)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = dy W: [M, N] x ([K, N])^T
            dx = _mm_nt(qdy.data, qdy.scale, wd.t(), ws, dt).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # dW = dy^T x: [N, M] x ([K, M])^T
            dw = _mm_nt(qdy.data.t(), qdy.scale, xd.t(), xs, dt).to(ctx.w_dtype)
        return dx, dw, None, None, None


def weight_operand(layer, weight: torch.Tensor, recording: bool):
    """Per-tensor quantized weight, cached per weight version (see mx_function)."""
    if layer.observer is not None or not layer.cache_weights:
        return quantize_operand(layer, weight, "weight", recording)
    key = ("tensorwise", weight._version, weight.data_ptr())
    cache = layer._weight_cache
    if key not in cache:
        cache.clear()
        with torch.no_grad():
            cache[key] = quantize_operand(layer, weight, "weight", recording)
        layer.weight_quantizations += 1
    return cache[key]
