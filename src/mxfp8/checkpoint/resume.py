"""Where a run starts: from scratch, from its newest intact checkpoint, or not at all.

The rules a resume follows (docs/reliability.md has the user's view):

- ``--resume`` of a directory that holds no run (no ``config.toml``) is an error.
- ``--resume auto`` (``run.resume = "auto"``) is one command for every launch of a job, as a
  scheduler requeues it: the command line describes the whole run (the saved config is not
  its base but what it is checked against). A directory that holds no run, or only what a
  start-up crash left (no checkpoint; maybe a torn ``config.toml``, ``metrics.jsonl``...), starts
  the run from step 0; one that holds this run continues it as ``--resume`` does (a finished
  one is complete); one that holds another run (its ``config.toml``, or its newest checkpoint's
  when that file is lost) is refused with every differing field listed.
- A run that is already complete is left untouched: :class:`RunComplete` says so, and the CLI
  exits 0. Asking it for more steps is an error (see :func:`check_changes`).
- A run that was started but never checkpointed starts again from scratch.
- Otherwise the newest checkpoint whose manifest verifies is loaded; newer broken ones are
  reported and skipped, never loaded. No intact checkpoint at all is an error.
- The config may change only in fields that do not change what the run computes
  (:data:`RESUMABLE_FIELDS`); any other change is refused with every field listed, old -> new.
  An adaptive recipe's switches to bf16 follow its telemetry cadence and the divergence
  thresholds, so for such a recipe those fields are part of the run (:func:`adaptive_fields`).
  ``mxfp8 compare`` uses the same fingerprint to decide whether a directory holds its run.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxfp8 import checkpoint as ckpt
from mxfp8.config.fields import ConfigError
from mxfp8.config.train_config import ModelSection, TrainConfig, load_config

AUTO = "auto"  # run.resume = "auto": start, continue or refuse (see the module docstring)
CONFIG_TOML = "config.toml"
# files a run writes beside its checkpoints (mxfp8.train.loop.RUN_FILES, which removes them)
_RUN_FILES = ("metrics.jsonl", "numerics.jsonl", "events.jsonl", "summary.json")

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
        "run.compile",  # compiled numbers follow eager ones within a measured tolerance
        "run.compile_quantize",  # the compiled quantizers are bit-exact with the eager ones
        "run.quantize_kernel",  # every kernel gives the same bits (tested)
        "run.mmap_threshold_kib",  # where freed memory goes, not what is computed
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


_DIVERGENCE_FIELDS = frozenset(f for f in RESUMABLE_FIELDS if f.startswith("divergence."))


def adaptive_fields(cfg: TrainConfig) -> frozenset[str]:
    """Resumable fields that are part of the run under ``cfg``'s recipe: an adaptive recipe
    (``recipe.adaptive``) switches a layer to bf16 from the telemetry of its telemetry steps
    (``run.telemetry_every``) and, with ``adaptive_on_divergence``, from the divergence events
    (the ``[divergence]`` thresholds decide them). Empty for every other recipe."""
    rec = cfg.recipe.build()
    if not rec.adaptive:
        return frozenset()
    divergence = _DIVERGENCE_FIELDS if rec.adaptive_on_divergence else frozenset()
    return frozenset({"run.telemetry_every"}) | divergence


@dataclass(frozen=True, eq=False)
class _Cadence:
    """``run.telemetry_every`` of an adaptive run, compared by the cadence it runs at: 0 means
    every ``recipe.adaptive_every`` steps (mxfp8.stats.telemetry.make_hook)."""

    value: int
    adaptive_every: int

    @property
    def every(self) -> int:
        return self.value or self.adaptive_every

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Cadence) and self.every == other.every

    def __hash__(self) -> int:
        return hash(self.every)

    def __repr__(self) -> str:
        if self.value:
            return repr(self.value)
        return f"0 (every {self.adaptive_every} steps: recipe.adaptive_every)"


def fingerprint(cfg: TrainConfig, guarded: frozenset[str] = frozenset()) -> dict[str, Any]:
    """What must be equal between a run on disk and a run that continues it; ``guarded``:
    resumable fields that are part of this run too (see :func:`adaptive_fields`)."""
    skip = (RESUMABLE_FIELDS - guarded) | _DERIVED_FIELDS
    out = {k: v for k, v in flatten(cfg).items() if k not in skip}
    if "run.telemetry_every" in out:
        out["run.telemetry_every"] = _Cadence(cfg.run.telemetry_every,
                                              cfg.recipe.build().adaptive_every)  # fmt: skip
    return out


def config_changes(old: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every fingerprinted field that differs."""
    guarded = adaptive_fields(old) & adaptive_fields(new)
    a, b = fingerprint(old, guarded), fingerprint(new, guarded)
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


def check_changes(saved: TrainConfig, cfg: TrainConfig, run_dir: Path, *,
                  auto: bool = False) -> None:  # fmt: skip
    """Refuse to continue ``saved`` (the run on disk) with a config that computes another run
    (``auto``: ``--resume auto``, whose command line names the whole run)."""
    changes = config_changes(saved, cfg)
    if not changes:
        return
    hint = ""
    if any(c[0] == "run.steps" for c in changes):
        hint = (
            " (run.steps sets the length of the learning-rate schedule, so a longer run is a "
            "different run from step 1: start it in a new --out)"
        )
    guarded = adaptive_fields(saved) & adaptive_fields(cfg)
    if any(c[0] in guarded for c in changes):
        hint += (
            f" (recipe {saved.recipe.name} is adaptive: its telemetry steps"
            f"{' and divergence events' if guarded & _DIVERGENCE_FIELDS else ''} decide which "
            "layers switch to bf16, so those fields are part of the run)"
        )
    if auto:
        raise ResumeError(
            f"--resume auto: {run_dir} holds another run: its config differs from this "
            f"command's in fields that change what it computes: {describe_changes(changes)}"
            f"{hint}. Give this run another --out, or continue that one with "
            f"mxfp8 train --resume --out {run_dir}"
        )
    may = sorted(RESUMABLE_FIELDS - {"run.out", "run.resume"} - guarded)
    raise ResumeError(
        f"cannot resume {run_dir}: the config differs from the run's own in fields that change "
        f"what it computes: {describe_changes(changes)}{hint}. Resume with the saved config "
        f"(mxfp8 train --resume --out {run_dir}); fields that may change on resume: "
        f"{', '.join(may)}"
    )


def saved_config(run_dir: Path) -> TrainConfig | None:
    path = run_dir / CONFIG_TOML
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
    :func:`mxfp8.checkpoint.write.recover`)."""
    run = cfg.run
    if run.resume == AUTO:
        return _find_start_auto(cfg, run_dir)
    if not run.resume:
        if (run_dir / "metrics.jsonl").exists() or ckpt.list_checkpoints(run_dir):
            raise ResumeError(
                f"{run_dir} already holds a run: pass --resume to continue it (or --resume "
                "auto, which also starts it when --out holds none), or another --out"
            )
        return StartPoint(None)
    saved = saved_config(run_dir)
    if saved is None:
        raise ResumeError(
            f"--resume: {run_dir} holds no run (no config.toml); start one without --resume "
            "(or with --resume auto, which starts it when --out holds none)"
        )
    return _continue(cfg, saved, run_dir, auto=False)


def _continue(cfg: TrainConfig, saved: TrainConfig, run_dir: Path, *, auto: bool) -> StartPoint:
    """Continue ``saved``, the run in ``run_dir``, as ``cfg``: from its newest intact
    checkpoint, from step 0 when it has none, or not at all (complete, or refused)."""
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
        if auto:  # a finished run is this command's only if it is the same run
            check_changes(saved, cfg, run_dir, auto=True)
        return StartPoint(latest, skipped, complete=True)
    check_changes(saved, cfg, run_dir, auto=auto)
    if latest is None and skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        flag = "--resume auto" if auto else "--resume"
        raise ResumeError(f"{flag}: no intact checkpoint in {run_dir} ({reasons})")
    return StartPoint(latest, skipped, fresh_restart=latest is None)


def _find_start_auto(cfg: TrainConfig, run_dir: Path) -> StartPoint:
    """``--resume auto``: start, continue or refuse (see the module docstring)."""
    ckpt.recover(run_dir)  # a checkpoint killed just before its rename becomes one first
    config = run_dir / CONFIG_TOML
    saved = None
    if config.is_file():
        # a torn file (this package writes it by an atomic rename, but another tool may not)
        # beside no checkpoint is start-up debris; beside checkpoints, an error saying why
        if _is_toml(config) or ckpt.list_checkpoints(run_dir):
            saved = load_config(config)
    elif ckpt.list_checkpoints(run_dir):  # config.toml lost: each checkpoint holds a copy
        latest, skipped = ckpt.latest_intact_checkpoint(run_dir)
        if latest is None:
            reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
            raise ResumeError(f"--resume auto: no intact checkpoint in {run_dir} ({reasons})")
        saved = load_config(latest / ckpt.CONFIG_FILE)
    if saved is None:  # no run here: nothing at all, or what a start-up crash left
        debris = config.exists() or any((run_dir / n).exists() for n in _RUN_FILES)
        return StartPoint(None, fresh_restart=debris)
    return _continue(_as_built(cfg, saved), saved, run_dir, auto=True)


def _is_toml(path: Path) -> bool:
    try:
        tomllib.loads(path.read_text(encoding="utf-8", errors="replace"))
    except tomllib.TOMLDecodeError:
        return False
    return True


def _as_built(cfg: TrainConfig, saved: TrainConfig) -> TrainConfig:
    """``cfg`` with what its start derives taken from ``saved`` (the config that start
    wrote): with the same ``run.init_from``, the model shape and (unless the command names
    one) the tokenizer come from that directory (mxfp8.train.init_from), so a command that
    leaves them to it is the same run. ``model.vocab_size`` is never compared."""
    if not cfg.run.init_from or cfg.run.init_from != saved.run.init_from:
        return cfg
    model = ModelSection(cfg.model.preset, {**saved.model.overrides, **cfg.model.overrides})
    data = cfg.data
    if not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=saved.data.tokenizer)
    return cfg.replace(model=model, data=data)


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
