"""Where a run starts: from scratch, from its newest intact checkpoint, or not at all.

The rules a resume follows (docs/reliability.md has the user's view):

- ``--resume`` of a directory that holds no run (no ``config.toml``) is an error.
- A run that is already complete is left untouched: :class:`RunComplete` says so, and the CLI
  exits 0. Asking it for more steps is an error (see :func:`check_changes`).
- A run that was started but never checkpointed starts again from scratch.
- Otherwise the newest checkpoint whose manifest verifies is loaded; newer broken ones are
  reported and skipped, never loaded. No intact checkpoint at all is an error.
- The config may change only in fields that do not change what the run computes
  (:data:`RESUMABLE_FIELDS`); any other change is refused with every field listed, old -> new.
  ``mxfp8 compare`` uses the same fingerprint to decide whether a directory holds its run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxfp8.train import checkpoint as ckpt
from mxfp8.train.config import TrainConfig, load_config
from mxfp8.train.fields import ConfigError

# Fields that may differ between a run and its resume: they change how a run is observed,
# stored or executed, never the numbers it computes. Everything else is part of the run.
RESUMABLE_FIELDS = frozenset(
    {
        "run.out",
        "run.resume",
        "run.stop_after",
        "run.progress",
        "run.log_every",
        "run.eval_every",
        "run.ckpt_every",
        "run.keep_last",
        "run.telemetry_every",
        "run.max_nonfinite_steps",
        "run.device",  # results stay exact on one machine; a move is the user's choice
        "run.compile",
        "run.compile_quantize",  # the compiled quantizers are bit-exact with the eager ones
        "run.quantize_kernel",  # every kernel gives the same bits (tested)
        "run.init_from",  # read at step 0 only; a resume continues from the checkpoint
        "run.activation_checkpointing",  # recomputes bit-identical values: memory, time only
        "data.cache_dir",  # where the prepared data lives, not what it is
        "divergence.ema_decay",
        "divergence.sigmas",
        "divergence.min_rel",
        "divergence.warmup_steps",
        "divergence.top_layers",
        # how the run is spread over processes: a resume may change the world size (DCP
        # reshards); fsdp with bf16 gathers computes slightly other numbers (docs/distributed.md)
        "parallel.mode",
        "parallel.backend",
        "parallel.reshard_after_forward",
        "parallel.param_dtype",
        "parallel.timeout_s",
    }
)
# the loop records the tokenizer's vocabulary size as a model override when none was given;
# whether the tokenizer matches is checked separately, from the checkpoint (data identity)
_DERIVED_FIELDS = frozenset({"model.vocab_size"})


class ResumeError(ConfigError):
    """A resume that would not continue the same run, or that has nothing to continue."""


class RunComplete(Exception):
    """``--resume`` of a run that has already done all its steps: nothing to do."""

    def __init__(self, run_dir: Path, steps: int) -> None:
        super().__init__(f"run {run_dir} is already complete ({steps} steps): nothing to do")
        self.run_dir, self.steps = run_dir, steps


def step_of(checkpoint: Path) -> int:
    """The step number of a checkpoint directory (``step_NNNNNNN``)."""
    return int(checkpoint.name.rpartition("_")[2])


def flatten(cfg: TrainConfig) -> dict[str, Any]:
    """``{"section.field": value}`` of every field of ``cfg`` (model/recipe: preset + overrides)."""
    out: dict[str, Any] = {}
    for section, body in cfg.to_dict().items():
        for key, value in body.items():
            out[f"{section}.{key}"] = value
    return out


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """What must be equal between a run on disk and a run that continues it."""
    skip = RESUMABLE_FIELDS | _DERIVED_FIELDS
    return {k: v for k, v in flatten(cfg).items() if k not in skip}


def config_changes(old: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every fingerprinted field that differs."""
    a, b = fingerprint(old), fingerprint(new)
    missing = object()
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    def show(v: Any) -> str:
        return "(unset)" if type(v) is object else repr(v)

    return "; ".join(f"{k}: {show(a)} -> {show(b)}" for k, a, b in changes)


def check_changes(saved: TrainConfig, cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to continue ``saved`` (the run on disk) with a config that computes another run."""
    changes = config_changes(saved, cfg)
    if not changes:
        return
    steps = [c for c in changes if c[0] == "run.steps"]
    hint = ""
    if steps:
        hint = (
            " (run.steps sets the length of the learning-rate schedule, so a longer run is a "
            "different run from step 1: start it in a new --out)"
        )
    raise ResumeError(
        f"cannot resume {run_dir}: the config differs from the run's own in fields that change "
        f"what it computes: {describe_changes(changes)}{hint}. Resume with the saved config "
        f"(mxfp8 train --resume --out {run_dir}); fields that may change on resume: "
        f"{', '.join(sorted(RESUMABLE_FIELDS - {'run.out', 'run.resume'}))}"
    )


def saved_config(run_dir: Path) -> TrainConfig | None:
    path = run_dir / "config.toml"
    return load_config(path) if path.is_file() else None


@dataclass
class StartPoint:
    """Where :func:`mxfp8.train.loop.train` begins: a checkpoint to load, or step 0."""

    checkpoint: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer, broken ones
    fresh_restart: bool = False  # a run that was started but never checkpointed
    complete: bool = False  # all steps done: the loop only restores summary.json if needed


def find_start(cfg: TrainConfig, run_dir: Path) -> StartPoint:
    """Decide where ``cfg`` starts in ``run_dir`` (see the module docstring); may raise
    :class:`ResumeError`. Changes nothing on disk but crash leftovers (see
    :func:`mxfp8.train.checkpoint.recover`)."""
    run = cfg.run
    if not run.resume:
        if (run_dir / "metrics.jsonl").exists() or ckpt.list_checkpoints(run_dir):
            raise ResumeError(
                f"{run_dir} already holds a run: pass --resume to continue it, or another --out"
            )
        return StartPoint(None)
    saved = saved_config(run_dir)
    if saved is None:
        raise ResumeError(
            f"--resume: {run_dir} holds no run (no config.toml); start one without --resume"
        )
    latest, skipped = ckpt.latest_intact_checkpoint(run_dir)
    done_steps = _completed_steps(run_dir, latest)
    if done_steps is not None and done_steps == saved.run.steps:
        if cfg.run.steps != saved.run.steps:
            raise ResumeError(
                f"run {run_dir} is complete ({saved.run.steps} steps) and cannot be continued "
                f"to run.steps={cfg.run.steps}: its learning-rate schedule spanned "
                f"{saved.run.steps} steps, and a {cfg.run.steps}-step run differs from it from "
                f"step 1 on. Start a new run with --steps {cfg.run.steps} and another --out"
            )
        return StartPoint(latest, skipped, complete=True)
    check_changes(saved, cfg, run_dir)
    if latest is None and skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise ResumeError(f"--resume: no intact checkpoint in {run_dir} ({reasons})")
    return StartPoint(latest, skipped, fresh_restart=latest is None)


def _completed_steps(run_dir: Path, latest: Path | None) -> int | None:
    """Steps of a finished run (its summary.json), else of its newest intact checkpoint."""
    import json

    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            steps = json.loads(summary.read_text()).get("steps")
        except (ValueError, OSError):
            steps = None
        if isinstance(steps, int):
            return steps
    if latest is not None:
        return step_of(latest)
    return None


def check_data_identity(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """The checkpoint's tokenizer and corpus must be the ones this run prepared."""
    if saved is None:  # checkpoints written before this check existed
        return
    diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise ResumeError(
            f"cannot resume: the data or tokenizer differ from the checkpoint's ({detail}); "
            "the token ids would mean other words. Resume with the run's own data and tokenizer"
        )
