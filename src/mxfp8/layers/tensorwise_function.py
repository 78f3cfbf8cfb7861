"""Per-tensor FP8 linear (current or delayed scaling): the classic Hopper-era recipes.

One fp32 scale per tensor, so a transposed quantized tensor is still correctly quantized:
x, W and dy are each quantized once and used (transposed where needed) in both GEMMs that
read them. The emulated GEMM multiplies the FP8 values (exact in bf16) with fp32
accumulation, then applies ``1 / (scale_a * scale_b)`` in fp32, as ``_scaled_mm`` does. For a
bf16 output the matmul result is rounded to bf16 before that rescale (one extra rounding, at
most half a bf16 ulp): the CPU has no bf16 x bf16 -> fp32 matmul, and these recipes are
baselines, not the subject of bit-exact tests.

Delayed scaling: each layer holds one amax tracker per tensor (input, weight, grad_output).
Every call quantizes with the scale from the history; the amaxes a call observes are kept as
*pending* (the max over the calls of one optimizer step) and appended to the history when the
next optimizer step begins. When a step begins is said by :func:`mxfp8.layers.step_window`:

- inside a window (the training loop wraps the micro-batches of each optimizer step in
  ``with step_window(model):``), opening the window commits the previous step's pending
  amaxes, so the history advances exactly once per window however many micro-batches run;
- outside any window (a loop that never opens one), each recording forward (training mode,
  grad enabled) counts as its own optimizer step: it first commits the pending amaxes of the
  previous forward and its backward, then records its own.

Evaluation (no grad, or ``eval()``) records and commits nothing. Checkpoints save the history
and the pending amaxes (:func:`mxfp8.layers.convert.scaling_state_dict`, taken after
``optimizer.step()``, with the window closed); after a restore, the next window (or recording
forward) commits the restored pending amaxes, exactly as the uninterrupted run does, so a
resumed run is bit-identical. Why not follow the weight's version counter, as an optimizer
step bumps it: writes through ``.data`` do not bump it, and a skipped step (found_inf) does
not write at all, so the history would depend on how the weights were written.
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

    def commit(self) -> None:
        """Append the pending amaxes (the step that just ended) to the histories.

        Called when a step window opens, and by each recording forward outside any window.
        """
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
        # committed by the next window open (or recording forward), as in the saved run
        self.pending = {op: a.clone() for op, a in state["pending"].items()}


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
        obs = layer.observing()
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
    """Per-tensor quantized weight: fresh each call, except inside a step window.

    Same rule as :func:`mxfp8.layers.mx_function.weight_operand`: the cache lives only while
    :func:`mxfp8.layers.step_window` is open on the layer (the weight cannot change between
    the micro-batches of one optimizer step), keyed on the version counter and storage as a
    guard against a replaced parameter. Under delayed scaling the history, and so the scale,
    is fixed within a window. A cached weight whose amax was not recorded yet (the window's
    first forward ran without grad) records it at the first recording call.
    """
    use_cache = (
        layer._window_open
        and layer._window_reuse
        and layer.observing() is None
        and layer.cache_weights
    )
    if not use_cache:
        layer.weight_quantizations += 1
        return quantize_operand(layer, weight, "weight", recording)
    key = ("tensorwise", weight._version, weight.data_ptr())
    cache = layer._weight_cache
    entry = cache.get(key)
    if entry is None:
        cache.clear()
        with torch.no_grad():
            q = quantize_operand(layer, weight, "weight", recording)
        layer.weight_quantizations += 1
        entry = cache[key] = [q, recording]
    elif recording and not entry[1] and layer.delayed_state is not None:
        layer.delayed_state.record("weight", entry[0].amax)
        entry[1] = True
    return entry[0]
