"""What the gradient-store tests (test_bf16_grads.py, test_mx_grads.py) share: a textbook
float64 AdamW, and two of its steps through a store checked against it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


def adamw(w: torch.Tensor, g: torch.Tensor, m, v, t: int):
    """One AdamW step in float64 (the textbook formula): new (w, m, v)."""
    b1, b2 = BETAS
    m = b1 * m + (1 - b1) * g.double()
    v = b2 * v + (1 - b2) * g.double() ** 2
    w = w * (1 - LR * WD) - LR / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + EPS)
    return w, m, v


def check_two_adamw_steps(
    model: nn.Module,
    ref: nn.Module,
    store,
    loss_of: Callable[[nn.Module, int], torch.Tensor],
    fp32_grads: Callable[[nn.Module, int], list[torch.Tensor]],
    held: Callable[[torch.Tensor], torch.Tensor],
    after_backward: Callable[[list[torch.Tensor]], None] = lambda g: None,
) -> None:
    """Two steps of torch's AdamW on ``model``, its gradients taken by ``store``, land where
    the float64 formula lands on ``held(g)`` (what the store must hold of fp32 gradient g),
    and elsewhere than the formula on the unrounded g (so the check can tell). ``ref``: a
    copy of ``model`` whose fp32 gradients are taken at the same weights;
    ``after_backward(g)`` checks the store after each backward, before the step."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ws = [p.detach().double() for p in ref.parameters()]
    ms, vs = [torch.zeros_like(w) for w in ws], [torch.zeros_like(w) for w in ws]
    fp32 = [list(ws), list(ms), list(vs)]  # the same formula on the unrounded gradients
    for t in (1, 2):
        g = fp32_grads(ref, t)  # the same weights as `model` (ref follows the formula)
        loss_of(model, t).backward()
        assert all(p.grad is None for p in model.parameters()), "no fp32 gradient is left"
        after_backward(g)
        store.step(opt)
        store.clear()
        new = [adamw(w, held(gi), m, v, t) for w, gi, m, v in zip(ws, g, ms, vs, strict=True)]
        ws, ms, vs = (list(x) for x in zip(*new, strict=True))
        new = [adamw(w, gi, m, v, t) for w, m, v, gi in zip(*fp32, g, strict=True)]
        fp32 = [list(x) for x in zip(*new, strict=True)]
        with torch.no_grad():  # the next gradient is taken at the weights the model has
            for p, q in zip(ref.parameters(), model.parameters(), strict=True):
                p.copy_(q)
    for p, w in zip(model.parameters(), ws, strict=True):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-6, atol=1e-7)
    gap = max(float((p.detach().double() - w).abs().max()) for p, w in
              zip(model.parameters(), fp32[0], strict=True))  # fmt: skip
    assert gap > 1e-5, "AdamW on the fp32 gradients must land elsewhere (the check can tell)"
