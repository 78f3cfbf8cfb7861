"""Optimizer pieces of the training loop: AdamW groups, the lr schedule, loss scaling, clipping.

Each piece is small, has its own ``state_dict``/``load_state_dict`` where it has state, and is
tested on its own; :mod:`mxfp8.train.loop` only wires them together.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from mxfp8.config.sections import LossScaleMode, ScheduleKind
from mxfp8.optim.adamw import StoredMomentsAdamW, local_shard
from mxfp8.optim.fp8_states import AdamWFP8States
from mxfp8.optim.mx_grads import MXHeldGrad

if TYPE_CHECKING:
    from mxfp8.config.sections import LossScaleConfig, OptimConfig, ScheduleConfig

__all__ = ["LossScaleMode", "ScheduleKind"]  # the config's choices, importable from here too


# --- AdamW ---------------------------------------------------------------------------------


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups: matrices decay, vectors (norm gains, biases) do not.

    Norms and biases set a scale or an offset, and pulling them to zero fights what they are
    for. Embeddings are matrices and decay with the rest unless ``decay_embeddings`` is off
    (with tied embeddings the same tensor is also the LM head). Shared parameters are listed
    once.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embeddings
        if p.ndim < 2 or (is_embedding and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class AdamWBF16States(StoredMomentsAdamW):
    """AdamW whose two moments are stored in bf16 (halving optimizer memory).

    The update is computed in fp32 from the bf16 moments and applied to the fp32 master
    weights; only the stored moments are rounded (the loop:
    :class:`~mxfp8.optim.adamw.StoredMomentsAdamW`). ``torch.optim.AdamW`` requires moments
    of the parameter's dtype, hence this small class.
    """

    def init_state(self, p: torch.Tensor) -> dict:
        return {"step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, dtype=torch.bfloat16),
                "exp_avg_sq": torch.zeros_like(p, dtype=torch.bfloat16)}  # fmt: skip

    def load(self, p: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return local_shard(state["exp_avg"]).float(), local_shard(state["exp_avg_sq"]).float()

    def store(self, p: torch.Tensor, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        local_shard(state["exp_avg"]).copy_(m)
        local_shard(state["exp_avg_sq"]).copy_(v)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, then put the moments back in bf16.

        ``Optimizer.load_state_dict`` casts floating-point state to the parameter's dtype
        (fp32 here). Left so, a resumed run would keep fp32 moments for good: twice the
        memory, and no longer bit-identical to the run it continues. The cast back is exact
        (the values were bf16 when saved).
        """
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over fp32 master weights, moments stored as ``cfg.states`` says: fp32 (torch's
    AdamW), bf16 (:class:`AdamWBF16States`) or 8-bit MX blocks (:class:`AdamWFP8States`)."""
    groups = param_groups(model, cfg)
    if cfg.states == "bf16":
        return AdamWBF16States(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.states == "fp8":
        return AdamWFP8States(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


# --- schedule ------------------------------------------------------------------------------


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr for 0-based optimizer step ``step`` of a ``total``-step run.

    A pure function of the step, so resuming needs no scheduler state beyond the step.
    """
    warmup = min(cfg.warmup_steps, total)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.kind is ScheduleKind.CONSTANT:
        return 1.0
    if cfg.kind is ScheduleKind.WSD:
        decay_steps = max(1, round(cfg.decay_fraction * total)) if cfg.decay_fraction else 0
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start or decay_steps == 0:
            return 1.0
        frac = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return 1.0 - (1.0 - floor) * frac
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup + 1) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """Sets the lr of every param group from :func:`lr_multiplier` before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total: int):
        self.optimizer, self.cfg, self.total = optimizer, cfg, total
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_index = 0

    def set_step(self, step: int) -> float:
        """Apply the lr of 0-based step ``step``; returns it (of the first group)."""
        self.step_index = step
        m = lr_multiplier(step, self.total, self.cfg)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * m
        return self.base_lrs[0] * m

    def state_dict(self) -> dict:
        return {"step_index": self.step_index, "base_lrs": list(self.base_lrs), "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.step_index = int(state["step_index"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.total = int(state["total"])


# --- dynamic loss scaling ------------------------------------------------------------------


class LossScaler:
    """Dynamic loss scaling: the loss is multiplied by ``scale`` before backward.

    A step whose unscaled gradients hold an Inf or NaN is skipped and the scale is multiplied
    by ``backoff_factor``; after ``growth_interval`` clean steps in a row it is multiplied by
    ``growth_factor``. Scales stay powers of two with the default factors, so scaling and
    unscaling are exact. A disabled scaler keeps scale 1 but still reports non-finite steps,
    which the loop skips (a NaN update would destroy the master weights).
    """

    def __init__(self, cfg: LossScaleConfig, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.scale = float(cfg.init_scale) if enabled else 1.0
        self.good_steps = 0
        self.skipped_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.scale != 1.0 else loss

    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Divide gradients by the scale, in place (skipped when the scale is 1)."""
        if self.scale == 1.0:
            return
        inv = 1.0 / self.scale
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv)

    def update(self, found_inf: bool) -> None:
        """Record one optimizer step: back off on Inf/NaN, grow after a clean streak."""
        if found_inf:
            self.skipped_steps += 1
            self.good_steps = 0
            if self.enabled:
                self.scale = max(self.cfg.min_scale, self.scale * self.cfg.backoff_factor)
            return
        self.good_steps += 1
        if self.enabled and self.good_steps >= self.cfg.growth_interval:
            self.scale *= self.cfg.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {
            "enabled": self.enabled,
            "scale": self.scale,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.enabled = bool(state["enabled"])
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])


# --- clipping ------------------------------------------------------------------------------


def _norm(grads: list[torch.Tensor], reduce_sq: Callable | None = None) -> torch.Tensor:
    """L2 norm of ``grads``. With ``reduce_sq`` (sharded gradients) the squares of this rank's
    shards are summed, then ``reduce_sq`` sums them over the ranks (in place)."""
    if reduce_sq is not None:
        local = [g.sq.sqrt() if isinstance(g, MXHeldGrad) else
                 torch.linalg.vector_norm(local_shard(g).float(), dtype=torch.float64)
                 for g in grads]  # fmt: skip
        sq = torch.stack(local).square().sum() if local else torch.zeros((), dtype=torch.float64)
        return reduce_sq(sq.reshape(1)).reshape(()).sqrt().float()
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(  # an MX-held gradient: the norm of the fp32 one it held
        torch.stack(
            [
                g.sq.sqrt().float()
                if isinstance(g, MXHeldGrad)
                else torch.linalg.vector_norm(g.float())
                for g in grads
            ]
        )  # fmt: skip
    )


def clip_gradients(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    max_norm: float,
    module_thresholds: Iterable[tuple[str, float]] = (),
    *,
    reduce_sq: Callable | None = None,
) -> tuple[float, bool]:
    """Clip per-module thresholds first, then the global norm; returns (norm, found_inf).

    ``norm`` is the global L2 norm of all gradients before any clipping (what is logged).
    ``module_thresholds`` are (fnmatch pattern on the parameter name, max norm); all
    parameters matching one pattern are clipped together as one group. Nothing is modified
    when a gradient is not finite: the step will be skipped.

    Sharded gradients (FSDP2: each rank holds a slice of every gradient) pass ``reduce_sq``,
    which sums a tensor over the ranks in place: every norm (global and per module) is then
    the norm of the full gradients, and every rank takes the same clipping decisions.
    """
    named = [(n, p) for n, p in named_params if p.grad is not None]
    module_thresholds = tuple(module_thresholds)
    total = _norm([p.grad for _, p in named], reduce_sq)
    total_f = float(total)
    if not math.isfinite(total_f):
        return total_f, True
    for pattern, threshold in module_thresholds:
        grads = [p.grad for n, p in named if fnmatch.fnmatchcase(n, pattern)]
        group_norm = float(_norm(grads, reduce_sq))
        if group_norm > threshold:
            coef = threshold / (group_norm + 1e-6)
            for g in grads:
                g.mul_(coef)
    if max_norm > 0:
        # recompute after per-module clipping (it may have lowered the norm)
        norm_now = (
            float(_norm([p.grad for _, p in named], reduce_sq)) if module_thresholds else total_f
        )
        if norm_now > max_norm:
            coef = max_norm / (norm_now + 1e-6)
            for _, p in named:
                p.grad.mul_(coef)
    return total_f, False
