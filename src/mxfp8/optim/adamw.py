"""AdamW with its moments stored in some compact form and the math in fp32: the one loop and
update that :class:`~mxfp8.optim.fp8_states.AdamWFP8States` and
:class:`mxfp8.train.optim.AdamWBF16States` share; each says only how a parameter's moments
are stored (:meth:`StoredMomentsAdamW.init_state`), read as fp32 (``load``) and written back
(``store``).

Per step and parameter: the moments are read as fp32, updated with the gradient, the decoupled
weight decay and the bias-corrected update are applied to the fp32 master weight, and only then
are the new moments written back: the step's own update uses the unrounded moments.
"""

from __future__ import annotations

import torch


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class StoredMomentsAdamW(torch.optim.Optimizer):
    """The AdamW step over moments kept by the subclass (module doc)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def init_state(self, p: torch.Tensor) -> dict:
        """The state of a parameter's first step, ``step`` included."""
        raise NotImplementedError

    def load(self, p: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) as fp32 tensors of this rank's shard, to be updated in place."""
        raise NotImplementedError

    def store(self, p: torch.Tensor, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        """Write the updated fp32 (m, v) back into ``state`` (nothing when ``load`` gave the
        stored tensors themselves)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self.init_state(p))
                state["step"] += 1
                t = state["step"].item()
                w, g = local_shard(p), local_shard(p.grad).float()
                m, v = self.load(p, state)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                self.store(p, state, m, v)
                w.mul_(1 - lr * wd)
                bias1, bias2 = 1 - beta1**t, 1 - beta2**t
                denom = (v / bias2).sqrt_().add_(eps)
                w.addcdiv_(m, denom, value=-lr / bias1)
        return loss
