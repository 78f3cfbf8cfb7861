"""The training loop: :func:`train` runs one :class:`TrainConfig` and writes its run directory.

The pieces live next to it: :mod:`~mxfp8.checkpoint.resume` decides where a run starts,
:mod:`~mxfp8.train.session` builds and restores what a process holds,
:mod:`~mxfp8.train.step` runs one optimizer step, :mod:`~mxfp8.train.preempt` turns SIGTERM /
SIGINT into a checkpointed stop. This module wires them: start, steps (with evaluation,
hooks, logging and checkpoints), summary.

What a run directory guarantees (docs/reliability.md): every file becomes visible complete
(checkpoints and ``config.toml``/``summary.json`` by atomic rename, ``*.jsonl`` append-only
and cut back to the checkpoint on resume), so a process killed at any moment leaves a
directory that ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxfp8 import checkpoint as ckpt
from mxfp8.checkpoint.resume import RunComplete, StartPoint, find_start
from mxfp8.config.fields import ConfigError
from mxfp8.config.train_config import TrainConfig
from mxfp8.fileio import write_text_atomically
from mxfp8.layers.convert import layer_recipes
from mxfp8.layers.recipe import Recipe
from mxfp8.layers.scratch import pool_nbytes
from mxfp8.model.compiled_blocks import GRAPHS, CompileMode, prepare_plans
from mxfp8.model.transformer import inference_forward
from mxfp8.parallel import LOCAL, Comm, DistEnv
from mxfp8.stats import adaptive, divergence, telemetry
from mxfp8.stats.jsonl import encode_row
from mxfp8.train import session as session_mod
from mxfp8.train.hooks import RunResult, TrainContext, TrainHook
from mxfp8.train.preempt import stop_on_signals
from mxfp8.train.runlog import SUMMARY_FILE, RunLog, perplexity
from mxfp8.train.session import Session, resolve_device
from mxfp8.train.step import NonFiniteError, NonFiniteGuard, run_step

__all__ = [
    "NonFiniteError",
    "RunComplete",
    "RunResult",
    "TrainContext",
    "TrainHook",
    "evaluate",
    "resolve_device",
    "train",
]

# files a run writes next to its checkpoints; a run restarted from scratch removes them first
RUN_FILES = ("metrics.jsonl", "numerics.jsonl", "events.jsonl", SUMMARY_FILE)


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _auto_hooks(cfg: TrainConfig, run_dir: Path) -> list[TrainHook]:
    """The stats floor's hooks every run gets: telemetry (when ``run.telemetry_every``), then
    divergence detection (telemetry first, so an event can name the layers it just measured),
    then the adaptive-precision policy (an adaptive recipe: it reads what both saw)."""
    tel, div = telemetry.make_hook(cfg, run_dir), divergence.make_hook(cfg, run_dir)
    made = (tel, div, adaptive.make_hook(cfg, run_dir, tel, div))
    return [h for h in made if h is not None]


def evaluate(model: nn.Module, batches, device: torch.device, comm: Comm = LOCAL,
             recipe: Recipe | None = None) -> float:  # fmt: skip
    """Mean validation loss over fixed batches, through :func:`inference_forward` (the
    recipe's autocast, as in training; bf16 when no recipe is given), the forward ``mxfp8
    eval`` runs too. In a distributed run each rank holds its slice of every batch and the
    result is the mean over the ranks, i.e. over the whole batches."""
    total = 0.0
    for x, y in batches:
        _, loss = inference_forward(model, x.to(device), y.to(device), recipe=recipe)
        total += float(loss)
    return comm.mean(total / len(batches))


def _say(cfg: TrainConfig, text: str) -> None:
    if cfg.run.progress and DistEnv.from_environ().is_main:  # rank 0 speaks for the job
        print(text, file=sys.stderr, flush=True)


def _prepare_dir(cfg: TrainConfig, run_dir: Path, start: StartPoint, comm: Comm) -> None:
    """Create (and probe) the run directory; clear a run that was never checkpointed. Rank 0
    does it while the other ranks wait (its error is every rank's)."""
    failed = None
    if comm.is_main:
        try:
            _prepare_dir_here(cfg, run_dir, start)
        except ConfigError as e:
            failed = str(e)
    failed = comm.broadcast(failed)
    if failed is not None:
        raise ConfigError(failed)


def _prepare_dir_here(cfg: TrainConfig, run_dir: Path, start: StartPoint) -> None:
    for path, why in start.skipped:
        print(f"mxfp8 train: warning: skipping damaged checkpoint {path}: {why}", file=sys.stderr)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir}: {e.strerror or e}") from e
    if start.fresh_restart:
        _say(cfg, f"{run_dir} has no checkpoint yet: starting the run again from step 0")
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json``, atomically, strict JSON (a NaN final loss is null and named in
    ``nonfinite_values``, as in the .jsonl files)."""
    text = json.dumps(encode_row(summary), indent=2, allow_nan=False)
    write_text_atomically(run_dir / SUMMARY_FILE, text + "\n")


def _restore_summary(run_dir: Path, checkpoint: Path | None) -> None:
    """A process killed between the final checkpoint and summary.json: the final checkpoint
    carries the summary, so the run directory is made whole again."""
    if (run_dir / SUMMARY_FILE).is_file() or checkpoint is None:
        return
    state = ckpt.load_state(checkpoint)
    if state.get("summary"):
        write_summary(run_dir, state["summary"])


def _summary(s: Session, val_loss: float | None, hooks: list[TrainHook]) -> dict[str, Any]:
    overall = s.tokens / s.clock.train_time_s if s.clock.train_time_s else 0.0
    steady = s.clock.steady_tokens_per_s()
    summary: dict[str, Any] = {
        "recipe": s.cfg.recipe.name,
        "steps": s.step,
        "final_val_loss": val_loss,
        "final_val_ppl": perplexity(val_loss) if val_loss is not None else None,
        # steady state: the first WARMUP_STEPS steps of each process (compilation) left out
        "tokens_per_s": steady if steady is not None else overall,
        "tokens_per_s_with_warmup": overall,
        "warmup_steps_excluded": session_mod.WARMUP_STEPS,
        "skipped_steps": s.scaler.skipped_steps,
        "diverged": val_loss is None or not math.isfinite(val_loss),
        "model": s.cfg.model.preset,
        "num_params": s.model.num_params() if hasattr(s.model, "num_params") else None,
        "tokens": s.tokens,
        "train_time_s": s.clock.train_time_s,
        "wall_time_s": s.clock.wall_time_s,
    }
    report = getattr(s.model, "mxfp8_report", None)
    if report is not None:  # memory the MX layers hold beyond activations (docs/performance.md)
        # the cache's bound; a step of one micro-batch keeps none (nothing to reuse)
        cached = report.weight_cache_bytes if s.cfg.run.accum_steps > 1 else 0
        summary["weight_cache_mib"] = cached / 2**20
        summary["scratch_pool_mib"] = pool_nbytes() / 2**20
        summary["layer_recipes"] = layer_recipes(s.model)
    for h in hooks:
        extra = h.summary()
        summary["diverged"] = summary["diverged"] or bool(extra.pop("diverged", False))
        summary.update(extra)
    return summary


def hook_states(hooks: list[TrainHook]) -> dict[str, Any]:
    """``state_key -> state_dict()`` of the hooks that carry state across a resume."""
    return {h.state_key: h.state_dict() for h in hooks if getattr(h, "state_key", None)}


def _checkpoint(s: Session, step: int, summary: dict | None, hooks: list[TrainHook], *,
                final: bool) -> None:  # fmt: skip
    """Checkpoint the session at ``step``; a distributed run writes DCP shards from every
    rank, and the final checkpoint also holds the consolidated ``model.safetensors``."""
    extra: dict[str, Any] = {"hooks": hook_states(hooks)}
    if summary is not None:
        extra["summary"] = summary
    dist = dict(optimizer=s.optimizer, comm=s.comm, consolidate=final) if s.distributed else {}
    ckpt.save_checkpoint(s.run_dir, step, model=s.model, state=s.state_dict(**extra),
                         config_toml=s.cfg.to_toml(), keep_last=s.cfg.run.keep_last,
                         **dist)  # fmt: skip


def train(cfg: TrainConfig, *, hooks: list[TrainHook] | tuple = ()) -> RunResult:
    """Train ``cfg`` (resuming from ``cfg.run.out`` when ``cfg.run.resume``); see module doc.

    Raises :class:`RunComplete` when resuming a finished run (nothing is changed),
    :class:`~mxfp8.checkpoint.resume.ResumeError` for a resume that would not continue the same
    run, and :class:`NonFiniteError` after too many non-finite steps in a row.
    """
    run_dir = Path(cfg.run.out) if cfg.run.out else default_run_dir(cfg)
    cfg = cfg.replace(run=dataclasses.replace(cfg.run, out=str(run_dir)))
    start = find_start(cfg, run_dir)  # reads only: a refused resume changes nothing
    if start.complete:
        if DistEnv.from_environ().is_main:
            _restore_summary(run_dir, start.checkpoint)
        raise RunComplete(run_dir, cfg.run.steps)
    # data first: bad input fails before anything is created in the run directory
    s = session_mod.build(cfg, run_dir, lambda text: _say(cfg, text),
                          fresh=start.checkpoint is None)  # fmt: skip
    cfg, run, comm = s.cfg, s.cfg.run, s.comm
    _prepare_dir(cfg, run_dir, start, comm)
    hook_state: dict[str, Any] = {}
    if start.checkpoint is not None:
        hook_state = s.load(start.checkpoint).get("hooks") or {}
        _say(cfg, f"resumed from {start.checkpoint} at step {s.step}")
    if comm.is_main:
        write_text_atomically(run_dir / "config.toml", cfg.to_toml())

    forward = s.forward_model or s.model
    if run.compile is CompileMode.MODEL:
        prepare_plans(s.model, s.device)  # else every MX layer's guard fails at step 2
        forward = torch.compile(forward)
    end = min(run.steps, s.step + run.stop_after) if run.stop_after else run.steps
    # the stats hooks (telemetry, divergence events) write files: rank 0's operands only
    hooks = [*hooks, *(_auto_hooks(cfg, run_dir) if comm.is_main else ())]
    ctx = TrainContext(cfg, s.model, s.optimizer, s.recipe, run_dir, s.device, s.step,
                       hook_state=hook_state)  # fmt: skip
    for h in hooks:
        h.on_train_start(ctx)
    log = RunLog(run_dir, total=run.steps, start=s.step, progress=run.progress,
                 enabled=comm.is_main)  # fmt: skip
    guard = NonFiniteGuard(run.max_nonfinite_steps)
    val_loss, summary = None, None
    window_tokens, window_time = 0, 0.0
    s.model.train()
    graphs = GRAPHS["block"]  # run.compile = block: graphs compiled so far in this process
    start_step = s.step
    with stop_on_signals() as stop:
        try:
            for step in range(s.step + 1, end + 1):
                for h in hooks:
                    h.on_step_start(step)
                metrics = run_step(s, step, forward)
                window_tokens += run.batch_size * run.seq_len * run.accum_steps
                window_time += metrics["step_time_s"]
                metrics["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                guard.check(s, metrics, log.message)
                if step == run.steps or (run.eval_every and step % run.eval_every == 0):
                    val_loss = evaluate(forward, s.val_batches, s.device, comm, s.recipe)
                    metrics.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
                    log.message(f"step {step}: val_loss {val_loss:.4f}, "
                                f"val_ppl {perplexity(val_loss):.2f}")  # fmt: skip
                if GRAPHS["block"] != graphs:  # the first step's, the first evaluation's
                    new, graphs = GRAPHS["block"] - graphs, GRAPHS["block"]
                    metrics["compiled_graphs"] = new
                    if step > start_step + 1:
                        log.message(f"step {step}: torch.compile compiled {new} more block "
                                    "graph(s)")  # fmt: skip
                for h in hooks:
                    h.on_step_end(step, metrics)
                log.step_done()
                # stop together: a signal or a hook's verdict on one rank stops every rank
                last = step == end or comm.any(ctx.stop or bool(stop))
                keys = ("val_loss", "nonfinite", "compiled_graphs")
                if step % run.log_every == 0 or last or any(k in metrics for k in keys):
                    log.log(metrics)
                    window_tokens, window_time = 0, 0.0
                if step == run.steps:
                    summary = _summary(s, val_loss, hooks)
                if last or (run.ckpt_every and step % run.ckpt_every == 0):
                    _checkpoint(s, step, summary, hooks, final=step == run.steps)
                if last:
                    break
        finally:
            log.close()

    completed = s.step == run.steps
    result = RunResult(
        run_dir=run_dir,
        step=s.step,
        completed=completed,
        final_val_loss=val_loss if completed else None,
        final_val_ppl=perplexity(val_loss) if completed and val_loss is not None else None,
        tokens_per_s=summary["tokens_per_s"] if summary else 0.0,
        skipped_steps=s.scaler.skipped_steps,
        stopped_by=stop.name or None,
        exit_code=stop.exit_code,
    )
    if summary is not None:
        result.summary = summary
    if summary is not None and comm.is_main:
        write_summary(run_dir, summary)
    for h in hooks:
        h.on_train_end(result)
    return result
