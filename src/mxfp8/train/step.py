"""One optimizer step, and what happens when its numbers are not finite.

In order: set the lr of this step; open the step window (the MX layers quantize each weight once
for all micro-batches, none kept when there is one, and delayed scaling advances its history
once); for each micro-batch, forward under the recipe's autocast (bf16 unless it says fp16 or
fp32) and backward of the scaled loss; close the window; unscale; measure the global gradient
norm; then either step AdamW on the fp32 master weights (after per-module and global clipping),
or, when the loss or a gradient is Inf/NaN, skip the update (a NaN update would destroy the
master weights) and let the loss scaler back off.

A skipped step is *flagged* (``metrics["nonfinite"]``, an event in ``events.jsonl``, a line on
the terminal) unless it is the routine overflow of dynamic loss scaling; after
``run.max_nonfinite_steps`` flagged steps in a row the run stops with :class:`NonFiniteError`,
naming the step and the first module whose forward output was non-finite.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
from torch import nn

from mxfp8.data.batches import get_batch
from mxfp8.layers.step import step_window
from mxfp8.optim.bf16_grads import gradient_holders, step_optimizer
from mxfp8.optim.mx_grads import MXGrads
from mxfp8.parallel.wrap import reduce_delayed_amax
from mxfp8.train.optim import clip_gradients
from mxfp8.train.runlog import peak_mem_mb
from mxfp8.train.session import Session


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


def micro_batch(s: Session, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) of micro-batch ``micro`` of 1-based optimizer step ``step``:
    this rank's slice of the global micro-batch (all of it for one process)."""
    run = s.cfg.run
    x, y = get_batch(s.data, "train", seed=run.seed, step=step - 1, micro=micro,
                     batch_size=run.batch_size, seq_len=run.seq_len)  # fmt: skip
    return s.local_rows(x).to(s.device), s.local_rows(y).to(s.device)


def run_step(s: Session, step: int, forward: nn.Module) -> dict[str, Any]:
    """Run optimizer step ``step`` (1-based) and return its metrics; ``forward`` is the model
    or its compiled wrapper."""
    accum = s.cfg.run.accum_steps
    t0 = time.perf_counter()
    lr = s.schedule.set_step(step - 1)
    loss_sum = 0.0
    no_sync = getattr(forward, "no_sync", None)  # DDP: all-reduce once, after the last
    with step_window(s.model, micro_batches=accum):
        for micro in range(accum):
            x, y = micro_batch(s, step, micro)
            later = no_sync is not None and micro < accum - 1
            if isinstance(s.grads, MXGrads):  # MX once, after the last micro-batch's backward
                s.grads.last = micro == accum - 1
            with no_sync() if later else contextlib.nullcontext():
                with s.recipe.autocast(s.device.type):
                    _, loss = forward(x, y)
                loss_sum += float(loss.detach())
                s.scaler.scale_loss(loss / accum if accum > 1 else loss).backward()
        reduce_delayed_amax(s.model, s.comm)  # one amax history on every rank
    # the mean over ranks: what is logged, and the same Inf/NaN verdict on every rank
    loss_sum = s.comm.mean(loss_sum)
    scale_used = s.scaler.scale
    if s.grads is not None:  # optim.grad_dtype bf16 / mx: unscale, clip, step the held grads
        s.grads.absorb()  # distributed: the reduced fp32 gradients (one process: none left)
    params = gradient_holders(s.named_params, s.grads)
    s.scaler.unscale_(p for _, p in params)
    # sharded gradients: the norms are over full parameters (squares summed over ranks)
    reduce = s.comm.sum_ if s.sharded and s.comm.active else None
    grad_norm, found_inf = clip_gradients(params, s.cfg.optim.grad_clip, s.clip_thresholds,
                                          reduce_sq=reduce)  # fmt: skip
    loss_finite = math.isfinite(loss_sum)
    skip = found_inf or not loss_finite
    if not skip:
        step_optimizer(s.optimizer, s.grads)
    s.scaler.update(skip)
    s.optimizer.zero_grad(set_to_none=True)
    if s.grads is not None:
        s.grads.clear()
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    dt = time.perf_counter() - t0
    tokens = s.cfg.run.batch_size * s.cfg.run.seq_len * accum
    s.step, s.tokens = step, s.tokens + tokens
    s.clock.step_done(dt, tokens)
    metrics: dict[str, Any] = {
        "step": step,
        "loss": loss_sum / accum,
        "lr": lr,
        "grad_norm": grad_norm,
        "loss_scale": scale_used,
        "skipped_steps": s.scaler.skipped_steps,
        "tokens": s.tokens,
        "step_time_s": dt,
        "peak_mem_mb": peak_mem_mb(s.device),
    }
    # a routine loss-scaling overflow (finite loss, scale still able to back off) is the
    # scaler's business; anything else that skipped the update is flagged
    routine = s.loss_scaling and loss_finite and scale_used > s.cfg.loss_scale.min_scale
    if skip and not routine:
        metrics["nonfinite"] = "loss" if not loss_finite else "gradients"
    return metrics


def first_nonfinite_module(s: Session, step: int) -> str | None:
    """Replay the forward of the step's first micro-batch and name the first module (in
    execution order) whose output holds an Inf or NaN; None if the forward is finite (the
    non-finite values arose in backward). Changes no state: no grad, no delayed-scaling
    record, no RNG use."""
    found: list[str] = []

    def check(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if found:
                return
            tensors = out if isinstance(out, tuple | list) else (out,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    if not bool(torch.isfinite(t).all()):
                        found.append(name or type(module).__name__)
                        return

        return hook

    handles = [m.register_forward_hook(check(n)) for n, m in s.model.named_modules()]
    try:
        x, y = micro_batch(s, step, 0)
        with torch.no_grad(), s.recipe.autocast(s.device.type):
            s.model(x, y)
    finally:
        for h in handles:
            h.remove()
    # the root module's output is also non-finite whenever a child's is: children fire first
    return found[0] if found else None


class NonFiniteGuard:
    """Counts flagged steps in a row and stops the run after ``limit`` (0 = never)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def check(self, s: Session, metrics: dict[str, Any], say) -> None:
        kind = metrics.get("nonfinite")
        if kind is None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        step = metrics["step"]
        module = first_nonfinite_module(s, step)
        metrics["nonfinite_module"] = module
        where = (
            f"first non-finite forward output: {module}"
            if module
            else "the forward pass was finite: the non-finite values arose in backward"
        )
        say(f"step {step}: non-finite {kind}, update skipped ({where})")
        if self.limit and self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"stopping at step {step}: {self.in_a_row} consecutive steps with a non-finite "
                f"loss or gradient (this one: {kind}; {where}). The last checkpoint holds the "
                "state before them; lower the lr, check the data, or raise "
                "run.max_nonfinite_steps"
            )
