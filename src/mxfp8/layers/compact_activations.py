"""Non-linear activations saved for backward as MX: FP8 codes plus E8M0 block scales.

An MX linear layer already keeps its saved input as FP8 codes and scales. What a block saves
outside its linear layers is, by default, kept whole: the fp32 residual stream at each
RMSNorm, SDPA's q, k, v, output and softmax statistics, and the SwiGLU intermediates. This
module keeps such inputs compact instead. :func:`compact_call` runs ``fn(*args)`` without
recording its autograd graph, saves the chosen tensor arguments as MX (E4M3 elements, blocks
of 32 along the last dim, the rceil scale rule: the paper's recipe for every operand) and, in
backward, dequantizes them and runs ``fn`` again under autograd to get the input gradients:
the same pattern as activation checkpointing, at the scale of one op, with its inputs
compressed.

What this gives, exactly:

- the forward output is ``fn(*args)`` bit for bit (the same ops on the same inputs);
- the gradients are those of ``fn`` at the dequantized inputs ``dequantize(quantize(a))``
  (the MX of each original, bit for bit) with every other argument as it was: tested against
  torch's own autograd of the same function at those inputs;
- what stays alive between forward and backward is, per compacted argument, its codes (one
  byte per element) and one scale byte per 32 elements, plus references to the arguments kept
  whole (parameters, rotary tables): nothing of ``fn``'s own intermediates or output.

The price is one more forward of ``fn`` in backward (RMSNorm and SwiGLU are elementwise;
SDPA's forward is about a third of attention's cost). Arguments whose last dim is not a
multiple of 32, or that are not floating point, are saved whole. The backward recomputation
runs under the forward's autocast state, and inside :func:`mxfp8.layers.recompute.recomputing`
so that nothing in ``fn`` counts it as another forward.

Under activation checkpointing the codes and scales are saved through ``save_for_backward``,
so the checkpoint discards and rebuilds them like any other saved tensor.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mxfp8.layers.recompute import recomputing
from mxfp8.numerics.formats import E4M3, ScaleRule
from mxfp8.numerics.quantize import dequantize, quantize
from mxfp8.numerics.tensor import MXTensor

BLOCK = 32
FORMAT = E4M3
RULE = ScaleRule.RCEIL

__all__ = ["CompactSaved", "compact_call", "compactable", "saved_mx"]


class CompactSaved(enum.StrEnum):
    """The saved activations that can be kept as MX (``run.compact_activations``)."""

    NORM = "norm"  # the input of every RMSNorm (the fp32 residual stream)
    ATTENTION = "attention"  # SDPA's q, k, v (its output and statistics are recomputed)
    SWIGLU = "swiglu"  # the SwiGLU's two inputs, w1 x and w3 x
    # SDPA's output and statistics not saved but recomputed from q, k, v kept whole: exact
    # (the output is wo's input, of which wo keeps its own MX copy)
    ATTENTION_OUT = "attention-out"

    @classmethod
    def parse_all(cls, names: Sequence[str]) -> frozenset[CompactSaved]:
        """A set of members from their names; a ValueError naming the valid ones otherwise."""
        out = set()
        for name in names:
            try:
                out.add(cls(name))
            except ValueError:
                valid = ", ".join(repr(m.value) for m in cls)
                raise ValueError(
                    f"unknown compact activation {name!r}; choose from {valid}"
                ) from None
        return frozenset(out)


def compactable(t: Any) -> bool:
    """Whether ``t`` would be saved as MX: a floating-point tensor of rank >= 1 whose last
    dim is a non-zero multiple of 32."""
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dim() >= 1
        and t.shape[-1] > 0
        and t.shape[-1] % BLOCK == 0
    )


def saved_mx(t: torch.Tensor, *, compiled: bool = False) -> MXTensor:
    """The MX copy of ``t`` that :func:`compact_call` keeps (E4M3, rceil, blocks of 32 along
    the last dim)."""
    return quantize(t.detach(), FORMAT, block_size=BLOCK, dim=-1, scale_rule=RULE,
                    compiled=compiled)  # fmt: skip


class _CompactCall(torch.autograd.Function):
    """``fn(*args)``; saves the arguments flagged in ``which`` as MX. See the module docstring."""

    @staticmethod
    def forward(ctx, fn: Callable, which: tuple[bool, ...], compiled: bool, *args):
        ctx.fn, ctx.compiled = fn, compiled
        ctx.autocast = (
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
        )
        # per argument: ("mx", index of its codes, dtype, MXTensor metadata) | ("whole",
        # index) | ("value", obj). The codes and scales go through save_for_backward (so that
        # checkpointing and saved-tensor hooks see them); only metadata stays on ctx.
        layout: list[tuple] = []
        tensors: list[torch.Tensor] = []
        for a, compact in zip(args, which, strict=True):
            if compact and compactable(a):
                q = saved_mx(a, compiled=compiled)
                layout.append(("mx", len(tensors), a.dtype, _meta(q)))
                tensors += [q.data, q.scale]
            elif isinstance(a, torch.Tensor):
                layout.append(("whole", len(tensors)))
                tensors.append(a)
            else:
                layout.append(("value", a))
        ctx.layout = layout
        ctx.save_for_backward(*tensors)
        ctx.needs = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs: list[Any] = []
        for entry in ctx.layout:
            if entry[0] == "mx":
                _, i, dtype, meta = entry
                q = MXTensor(saved[i], saved[i + 1], **meta)
                inputs.append(dequantize(q, dtype, compiled=ctx.compiled))
            elif entry[0] == "whole":
                inputs.append(saved[entry[1]])
            else:
                inputs.append(entry[1])
        leaves = []
        for j, a in enumerate(inputs):
            if ctx.needs[j]:
                a = a.detach().requires_grad_(True)
                inputs[j] = a
                leaves.append(a)
        cpu_on, cpu_dtype, cuda_on, cuda_dtype = ctx.autocast
        with (
            torch.enable_grad(),
            recomputing(),
            torch.autocast("cpu", dtype=cpu_dtype, enabled=cpu_on),
            torch.autocast("cuda", dtype=cuda_dtype, enabled=cuda_on),
        ):
            out = ctx.fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True)
                 if g is not None and o.requires_grad]  # fmt: skip
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                  allow_unused=True) if pairs else [None] * len(leaves)  # fmt: skip
        it = iter(got)
        return (None, None, None, *(next(it) if need else None for need in ctx.needs))


def _meta(q: MXTensor) -> dict[str, Any]:
    return {"fmt": q.fmt, "block_size": q.block_size, "dim": q.dim, "scale_rule": q.scale_rule}


def compact_call(fn: Callable, *args: Any, compact: Sequence[bool], compiled: bool = False) -> Any:
    """``fn(*args)``, with the arguments flagged in ``compact`` saved for backward as MX.

    ``fn`` must be a pure function of its arguments (same inputs, same outputs: no RNG, no
    state that changes between forward and backward) returning a tensor or a tuple of
    tensors. Outside autograd (no grad, or nothing requiring grad) it is just ``fn(*args)``.
    ``compiled``: quantize and dequantize with the compiled kernels (the same bits).
    """
    if len(compact) != len(args):
        raise ValueError(f"compact has {len(compact)} flags for {len(args)} arguments")
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )
    if not needs_grad:
        return fn(*args)
    return _CompactCall.apply(fn, tuple(bool(c) for c in compact), compiled, *args)
