"""Gradients held in bf16 between backward and the optimizer step (``optim.grad_dtype = bf16``).

Autograd produces each parameter's gradient in the parameter's dtype (fp32 master weights:
fp32 gradients). :class:`BF16Grads` takes each one into a bf16 store and frees the fp32 tensor:

- **one process**: as it is accumulated, from a ``register_post_accumulate_grad_hook`` on each
  parameter. At any moment at most the gradients autograd is finishing exist in fp32, never a
  full fp32 set; with gradient accumulation each micro-batch's gradient is added into the
  bf16 store (the sum computed in fp32, rounded to bf16 once per micro-batch).
- **DDP / FSDP2**: the fp32 gradient must first be all-reduced (DDP, at the end of the last
  micro-batch's backward, into ``p.grad``) or reduce-scattered (FSDP2, which assigns the
  sharded ``p.grad`` itself, past any hook): the loop calls :meth:`BF16Grads.absorb` after the
  last backward, so the fp32 gradients (and DDP's buckets) exist until then; what bf16 saves
  there is the held gradients during unscaling, clipping and the step.

The optimizer step reads fp32: :meth:`BF16Grads.step` gives the optimizer one parameter at a
time, its held gradient widened to fp32 (exact), so the update is fp32 on the fp32 master
weights and at most one parameter's fp32 gradient exists. Unscaling and clipping act on the
held bf16 tensors through :meth:`BF16Grads.holders` (objects with a ``grad``), so the norm that
is logged and clipped is the norm of exactly what the optimizer will see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class Held:
    """A held gradient where the unscaler and the clipping look for one (``.grad``)."""

    grad: torch.Tensor


class BF16Grads:
    """The bf16 gradient store of ``named_params`` (module doc); ``hooks``: take each gradient
    as autograd accumulates it (one process), else only in :meth:`absorb`."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, hooks: bool):
        self.named: list[tuple[str, torch.nn.Parameter]] = []
        seen: set[int] = set()
        for name, p in named_params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.named.append((name, p))
        self.held: dict[int, torch.Tensor] = {}
        self.handles = [p.register_post_accumulate_grad_hook(self._take) for _, p in self.named]
        if not hooks:
            self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _take(self, p: torch.nn.Parameter) -> None:
        """Move ``p.grad`` into the store (added to what it holds) and free it."""
        g = p.grad
        if g is None:
            return
        held = self.held.get(id(p))
        if held is None:
            self.held[id(p)] = g.to(torch.bfloat16)
        else:
            held.add_(g)  # computed in fp32, rounded to bf16
        p.grad = None

    def absorb(self) -> None:
        """Take every gradient present in ``p.grad`` (after a distributed backward)."""
        for _, p in self.named:
            self._take(p)

    def _ready(self) -> dict:
        """The gradients the step will use, by id of the parameter (a subclass may hold them
        elsewhere than the bf16 store)."""
        return self.held

    def _for_step(self, p: torch.nn.Parameter, held) -> torch.Tensor:
        """``held`` as the gradient the optimizer reads: widened to the parameter's dtype."""
        return held.to(p.dtype)

    def holders(self) -> list[tuple[str, Held]]:
        """(name, :class:`Held`) of every held gradient, in parameter order."""
        ready = self._ready()
        return [(n, Held(ready[id(p)])) for n, p in self.named if id(p) in ready]

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` one parameter at a time on its held gradient, widened to fp32."""
        ready = self._ready()
        for _, p in self.named:
            held = ready.get(id(p))
            if held is None:
                continue
            p.grad = self._for_step(p, held)
            optimizer.step()
            p.grad = None

    def clear(self) -> None:
        """Drop every held gradient (after the step, or a skipped step)."""
        self.held.clear()


def gradient_holders(named_params, grads: BF16Grads | None) -> list:
    """What unscaling and clipping act on: the parameters themselves, or the (name, holder)
    pairs of the bf16 store when gradients are held there."""
    return list(named_params) if grads is None else grads.holders()


def step_optimizer(optimizer: torch.optim.Optimizer, grads: BF16Grads | None) -> None:
    """``optimizer.step()`` on the parameters' gradients, or on the bf16 store's."""
    if grads is None:
        optimizer.step()
    else:
        grads.step(optimizer)
