"""The LM head and the cross-entropy in chunks of tokens: the [tokens, vocab] logits and their
gradient never exist whole.

The unchunked head computes ``logits = h @ W^T`` for every token at once ([N, V], and again in
fp32 for the loss), saves it for backward, and builds a gradient of the same size. At a real
vocabulary that is the largest tensor of a step: 128k entries x 4096 tokens is 2 GiB in fp32.
:func:`chunked_cross_entropy` computes the mean next-token loss from ``h`` [N, d] and ``W``
[V, d] ``chunk`` rows at a time. Forward keeps each row's log-sum-exp (N floats) and nothing
of the logits; backward recomputes each chunk's logits and turns them straight into that
chunk's ``dh`` and its share of ``dW``, so the peak is one chunk's logits ([chunk, V]).

The arithmetic is the unchunked one: the GEMMs run in the dtype autocast gives the head (the
inputs cast to it, its output rounded to it), softmax and the loss in fp32; the weight
gradient is accumulated over chunks in fp32 (one GEMM of the unchunked backward accumulates in
fp32 as well, then rounds once to the compute dtype, so in bf16 the chunked ``dW`` is the more
precise one). In fp32 the two agree to fp32 rounding (tested); in bf16 to bf16 rounding of the
head's GEMMs.
"""

from __future__ import annotations

from typing import Any

import torch


def _head_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype an ``nn.Linear`` head runs in here: autocast's, else the input's."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        n = h.shape[0]
        w = weight.to(dtype)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        picked = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            logits = (h[s : s + chunk].to(dtype) @ w.T).float()
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            picked[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None])[:, 0]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        n = h.shape[0]
        w = weight.to(dtype)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        scale = grad.float() / n  # d(mean)/d(row loss)
        for s in range(0, n, chunk):
            hc = h[s : s + chunk].to(dtype)
            logits = (hc @ w.T).float()
            # d loss_row / d logits = softmax - onehot(target)
            g = torch.exp(logits - lse[s : s + chunk, None])
            g[torch.arange(g.shape[0], device=g.device), targets[s : s + chunk]] -= 1.0
            g = (g * scale).to(dtype)
            if dh is not None:
                dh[s : s + chunk] = (g @ w).to(h.dtype)
            if dw is not None:
                dw += (g.T @ hc).float()
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int) -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy of ``h @ weight^T`` ([N, V] logits, never built whole) against
    ``targets`` [N], ``chunk`` rows at a time (see the module doc)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, d] and targets [N], got {tuple(h.shape)} and "
                         f"{tuple(targets.shape)}")  # fmt: skip
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk, _head_dtype(h))
