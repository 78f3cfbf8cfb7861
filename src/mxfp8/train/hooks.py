"""Extension points of the training loop: hooks, what they see, and what a run returns.

Other floors attach here without editing the loop: numerics telemetry attaches observers on
telemetry steps, a divergence detector looks at every loss. The loop installs the stats
floor's hooks itself, from ``make_hook(cfg, run_dir) -> TrainHook | None`` of
``mxfp8.stats.telemetry`` (when ``run.telemetry_every``) and ``mxfp8.stats.divergence``
(always); :func:`mxfp8.train.loop.train` takes more through its ``hooks`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxfp8.config.train_config import TrainConfig


class TrainHook:
    """Extension point: subclass and override what you need; pass instances to :func:`train`.

    Steps are 1-based (step ``s`` is the s-th optimizer step). ``on_step_end`` receives the
    step's metrics (``val_loss``/``val_ppl`` included at eval steps) before they are logged,
    and may add keys to it. Set ``ctx.stop = True`` to end the run after the current step
    (a checkpoint is written). :meth:`summary` adds keys to ``summary.json`` (e.g.
    ``diverged``).

    A hook whose decisions depend on what it saw before (a running baseline) names a
    ``state_key``: every checkpoint stores its :meth:`state_dict` under that key (plain
    values only), and a resumed run hands it back in ``ctx.hook_state[state_key]``, so the
    hook continues exactly where the uninterrupted run would be.
    """

    state_key: str | None = None

    def on_train_start(self, ctx: TrainContext) -> None: ...

    def on_step_start(self, step: int) -> None: ...

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, result: RunResult) -> None: ...

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}


@dataclass
class TrainContext:
    """What hooks can see: the config, the (converted, uncompiled) model, the run directory."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    recipe: Any
    run_dir: Path
    device: torch.device
    start_step: int
    stop: bool = False
    # on resume: the checkpoint's state of each hook, by ``state_key`` (empty at step 0, and
    # for a checkpoint written before hooks had state)
    hook_state: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """What :func:`train` returns. ``completed`` is False after ``stop_after`` or a signal."""

    run_dir: Path
    step: int
    completed: bool
    final_val_loss: float | None
    final_val_ppl: float | None
    tokens_per_s: float
    skipped_steps: int
    summary: dict[str, Any] = field(default_factory=dict)
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early
    exit_code: int = 0  # 128 + the signal number then (143, 130), as a shell reports it
