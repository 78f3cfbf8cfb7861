"""The training loop: :func:`train` runs one :class:`TrainConfig` and writes its run directory.

One optimizer step, in order: set the lr of this step; for each micro-batch, forward under
bf16 autocast (the recipe's MX layers quantize their own GEMMs) and backward of the scaled
loss; unscale; measure the global gradient norm; on Inf/NaN skip the step and back the loss
scale off, else clip (per module, then globally) and step AdamW on the fp32 master weights.

Everything a step depends on is either in the checkpoint (weights, AdamW moments, loss scaler,
delayed-scaling amax histories, RNG) or a pure function of the step number (lr, data batch),
which is why a resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxfp8.layers.convert import convert_model, load_scaling_state_dict, scaling_state_dict
from mxfp8.stats import divergence, telemetry
from mxfp8.train import checkpoint as ckpt
from mxfp8.train.config import LossScaleMode, ModelSection, TrainConfig
from mxfp8.train.data import eval_batches, get_batch, prepare_data
from mxfp8.train.hooks import RunResult, TrainContext, TrainHook
from mxfp8.train.model import Transformer
from mxfp8.train.optim import LossScaler, Schedule, build_optimizer, clip_gradients
from mxfp8.train.runlog import SUMMARY_FILE, RunLog, peak_mem_mb, perplexity

__all__ = ["RunResult", "TrainContext", "TrainHook", "evaluate", "train"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _auto_hooks(cfg: TrainConfig, run_dir: Path) -> list[TrainHook]:
    """The stats floor's hooks every run gets: telemetry (when ``run.telemetry_every``), then
    divergence detection (telemetry first, so an event can name the layers it just measured)."""
    made = (telemetry.make_hook(cfg, run_dir), divergence.make_hook(cfg, run_dir))
    return [h for h in made if h is not None]


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device) -> float:
    """Mean validation loss over fixed batches (bf16 autocast, as in training)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / len(batches)


def _say(cfg: TrainConfig, text: str) -> None:
    if cfg.run.progress:
        print(text, file=sys.stderr, flush=True)


def train(cfg: TrainConfig, *, hooks: list[TrainHook] | tuple = ()) -> RunResult:
    """Train ``cfg`` (resuming from ``cfg.run.out`` when ``cfg.run.resume``); see module doc."""
    run = cfg.run
    run_dir = Path(run.out) if run.out else default_run_dir(cfg)
    cfg = cfg.replace(run=dataclasses.replace(run, out=str(run_dir)))
    run = cfg.run
    latest = ckpt.latest_checkpoint(run_dir) if run.resume else None
    if run.resume and latest is None:
        _say(cfg, f"no checkpoint in {run_dir}: starting from scratch")
    if latest is None and (run_dir / "metrics.jsonl").exists() and not run.resume:
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume or another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(run.device)

    t0 = time.perf_counter()
    data = prepare_data(cfg.data)
    _say(cfg, f"data: {len(data.train):,} train / {len(data.val):,} val tokens, vocab "
              f"{data.vocab_size} ({time.perf_counter() - t0:.1f} s) in {data.path}")  # fmt: skip
    model_cfg = cfg.model.build()
    if "vocab_size" not in cfg.model.overrides:  # the model's vocab follows the tokenizer's
        over = {**cfg.model.overrides, "vocab_size": data.vocab_size}
        cfg = cfg.replace(model=ModelSection(cfg.model.preset, over))
        model_cfg = cfg.model.build()
    elif model_cfg.vocab_size < data.vocab_size:
        raise ValueError(f"model.vocab_size {model_cfg.vocab_size} < tokenizer's {data.vocab_size}")

    recipe = cfg.recipe.build()
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    model = Transformer(model_cfg).to(device)
    if recipe.quantized:
        model = convert_model(model, recipe, compile_quantize=run.compile_quantize)
    report = getattr(model, "mxfp8_report", None)
    n_mx = len(report.converted) if report is not None else 0
    _say(cfg, f"model: {cfg.model.preset}, {model.num_params():,} parameters; recipe "
              f"{recipe.name}: {n_mx} linear layers quantized")  # fmt: skip
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule(optimizer, cfg.schedule, total=run.steps)
    mode = cfg.loss_scale.enabled
    scaling_on = mode is LossScaleMode.ON or (
        mode is LossScaleMode.AUTO and bool(recipe.dynamic_loss_scaling)
    )
    scaler = LossScaler(cfg.loss_scale, enabled=scaling_on)
    start, tokens, train_time = 0, 0, 0.0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["loss_scaler"])
        if state.get("scaling") is not None:  # delayed-scaling amax histories
            load_scaling_state_dict(model, state["scaling"])
        ckpt.set_rng_state(state["rng"])
        start, tokens, train_time = state["step"], state["tokens"], state["train_time_s"]
        position = state["data"]  # batches are f(seed, step): the position is that pair
        if position != {"seed": run.seed, "next_step": start}:
            raise ValueError(
                f"checkpoint {latest} was written at data position {position}, but this run "
                f"would continue at seed {run.seed}, step {start}: resume with the run's own "
                f"config (mxfp8 train --resume --out {run_dir})"
            )
        _say(cfg, f"resumed from {latest} at step {start}")
    (run_dir / "config.toml").write_text(cfg.to_toml())

    step_fn = torch.compile(model) if run.compile else model
    accum = run.accum_steps
    tokens_per_step = run.batch_size * run.seq_len * accum
    val_batches = eval_batches(data, batch_size=run.batch_size, seq_len=run.seq_len,
                               n_batches=run.eval_batches)  # fmt: skip
    end = min(run.steps, start + run.stop_after) if run.stop_after else run.steps
    hooks = [*hooks, *_auto_hooks(cfg, run_dir)]
    ctx = TrainContext(cfg, model, optimizer, recipe, run_dir, device, start)
    for h in hooks:
        h.on_train_start(ctx)
    log = RunLog(run_dir, total=run.steps, start=start, progress=run.progress)
    named_params = list(model.named_parameters())
    thresholds = cfg.optim.module_thresholds()
    val_loss = None
    window_tokens, window_time = 0, 0.0
    model.train()
    step = start
    try:
        for step in range(start + 1, end + 1):
            for h in hooks:
                h.on_step_start(step)
            t_step = time.perf_counter()
            lr = schedule.set_step(step - 1)
            loss_sum = 0.0
            for micro in range(accum):
                x, y = get_batch(data, "train", seed=run.seed, step=step - 1, micro=micro,
                                 batch_size=run.batch_size, seq_len=run.seq_len)  # fmt: skip
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    _, loss = step_fn(x.to(device), y.to(device))
                loss_sum += float(loss.detach())
                scaler.scale_loss(loss / accum if accum > 1 else loss).backward()
            scale_used = scaler.scale
            scaler.unscale_(p for _, p in named_params)
            grad_norm, found_inf = clip_gradients(named_params, cfg.optim.grad_clip, thresholds)
            if not found_inf:
                optimizer.step()
            scaler.update(found_inf)
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t_step
            train_time += dt
            tokens += tokens_per_step
            window_tokens += tokens_per_step
            window_time += dt
            metrics: dict[str, Any] = {
                "step": step,
                "loss": loss_sum / accum,
                "lr": lr,
                "grad_norm": grad_norm,
                "loss_scale": scale_used,
                "skipped_steps": scaler.skipped_steps,
                "tokens": tokens,
                "tokens_per_s": window_tokens / max(window_time, 1e-9),
                "step_time_s": dt,
                "peak_mem_mb": peak_mem_mb(device),
            }
            if step == run.steps or (run.eval_every and step % run.eval_every == 0):
                val_loss = evaluate(step_fn, val_batches, device)
                metrics.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
                log.message(
                    f"step {step}: val_loss {val_loss:.4f}, val_ppl {perplexity(val_loss):.2f}"
                )  # noqa: E501
            for h in hooks:
                h.on_step_end(step, metrics)
            log.step_done()
            if step % run.log_every == 0 or "val_loss" in metrics or step == end or ctx.stop:
                log.log(metrics)
                window_tokens, window_time = 0, 0.0
            last = step == end or ctx.stop
            if last or (run.ckpt_every and step % run.ckpt_every == 0):
                state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "loss_scaler": scaler.state_dict(),
                    "scaling": scaling_state_dict(model),
                    "rng": ckpt.rng_state(),
                    "data": {"seed": run.seed, "next_step": step},  # batches: f(seed, step)
                    "tokens": tokens,
                    "train_time_s": train_time,
                }
                toml = cfg.to_toml()
                ckpt.save_checkpoint(
                    run_dir,
                    step,
                    model=model,
                    state=state,
                    config_toml=toml,
                    keep_last=run.keep_last,
                )
            if ctx.stop:
                break
    finally:
        log.close()

    completed = step == run.steps
    result = RunResult(
        run_dir=run_dir,
        step=step,
        completed=completed,
        final_val_loss=val_loss if completed else None,
        final_val_ppl=perplexity(val_loss) if completed and val_loss is not None else None,
        tokens_per_s=tokens / train_time if train_time else 0.0,
        skipped_steps=scaler.skipped_steps,
    )
    if completed:
        summary: dict[str, Any] = {
            "recipe": cfg.recipe.name,
            "steps": step,
            "final_val_loss": result.final_val_loss,
            "final_val_ppl": result.final_val_ppl,
            "tokens_per_s": result.tokens_per_s,
            "skipped_steps": result.skipped_steps,
            "diverged": val_loss is None or not math.isfinite(val_loss),
            "model": cfg.model.preset,
            "num_params": model.num_params() if hasattr(model, "num_params") else None,
            "tokens": tokens,
            "train_time_s": train_time,
        }
        for h in hooks:
            extra = h.summary()
            summary["diverged"] = summary["diverged"] or bool(extra.pop("diverged", False))
            summary.update(extra)
        result.summary = summary
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    for h in hooks:
        h.on_train_end(result)
    return result
