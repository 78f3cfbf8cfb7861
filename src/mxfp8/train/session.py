"""Everything one training process holds, built from a config, and its checkpointed state.

:func:`build` prepares the data, builds and converts the model, and makes the optimizer,
schedule and loss scaler. :meth:`Session.state_dict` is everything a step depends on that is
not a pure function of the step number (weights go separately, to safetensors), and
:meth:`Session.load` restores it, which is why a resumed run reproduces an uninterrupted one
bit for bit.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxfp8.layers.convert import convert_model, load_scaling_state_dict, scaling_state_dict
from mxfp8.train import checkpoint as ckpt
from mxfp8.train.config import LossScaleMode, ModelSection, TrainConfig
from mxfp8.train.data import PreparedData, eval_batches, prepare_data, require_tokens
from mxfp8.train.fields import ConfigError
from mxfp8.train.model import Transformer
from mxfp8.train.optim import LossScaler, Schedule, build_optimizer
from mxfp8.train.resume import ResumeError, check_data_identity

# steps of each process left out of the steady-state throughput: the first compiles the
# quantizers (tens of seconds on CPU), the second may still meet new shapes
WARMUP_STEPS = 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Clock:
    """Training time, steady-state throughput and wall time, carried across resumes.

    ``train_time_s`` sums every optimizer step; the steady-state figures leave out the first
    :data:`WARMUP_STEPS` steps of each process (compilation); ``wall_time_s`` is the processes'
    wall time up to the last checkpoint (work that a crash lost is not counted).
    """

    train_time_s: float = 0.0
    steady_time_s: float = 0.0
    steady_tokens: int = 0
    wall_before_s: float = 0.0
    process_steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def step_done(self, seconds: float, tokens: int) -> None:
        self.process_steps += 1
        self.train_time_s += seconds
        if self.process_steps > WARMUP_STEPS:
            self.steady_time_s += seconds
            self.steady_tokens += tokens

    @property
    def wall_time_s(self) -> float:
        return self.wall_before_s + time.perf_counter() - self.started

    def steady_tokens_per_s(self) -> float | None:
        return self.steady_tokens / self.steady_time_s if self.steady_time_s > 0 else None

    def state_dict(self) -> dict[str, float]:
        return {
            "train_time_s": self.train_time_s,
            "steady_time_s": self.steady_time_s,
            "steady_tokens": self.steady_tokens,
            "wall_time_s": self.wall_time_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.steady_time_s = float(state.get("steady_time_s", 0.0))
        self.steady_tokens = int(state.get("steady_tokens", 0))
        self.wall_before_s = float(state.get("wall_time_s", 0.0))


@dataclass
class Session:
    """One process's training objects, and the counters the checkpoint carries."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    data: PreparedData
    model: nn.Module
    recipe: Any
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: LossScaler
    val_batches: list
    # fixed for the run: computed once here, not at every step
    named_params: list = field(default_factory=list)
    clip_thresholds: tuple = ()
    step: int = 0
    tokens: int = 0
    clock: Clock = field(default_factory=Clock)

    @property
    def loss_scaling(self) -> bool:
        return self.scaler.enabled

    def data_identity(self) -> dict[str, Any]:
        """What the token ids mean: the prepared corpus and the tokenizer's exact content."""
        tok = self.data.path / "tokenizer.json"
        sha = hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None
        return {
            "prepared": self.data.path.name,
            "vocab_size": self.data.vocab_size,
            "tokenizer_sha256": sha,
        }

    def state_dict(self, **extra: Any) -> dict[str, Any]:
        """The ``state.pt`` of a checkpoint at the current step."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "scaling": scaling_state_dict(self.model),
            "rng": ckpt.rng_state(),
            "data": {"seed": self.cfg.run.seed, "next_step": self.step},  # batches: f(seed, step)
            "data_identity": self.data_identity(),
            "tokens": self.tokens,
            "clock": self.clock.state_dict(),
            **extra,
        }

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Restore weights and state from ``checkpoint``; returns its ``state.pt`` dict."""
        state = ckpt.load_checkpoint(checkpoint, self.model, verify=False)  # find_start did
        check_data_identity(state.get("data_identity"), self.data_identity())
        seed = self.cfg.run.seed
        if state["data"] != {"seed": seed, "next_step": state["step"]}:
            raise ResumeError(
                f"checkpoint {checkpoint} was written at data position {state['data']}, but "
                f"this run would continue at seed {seed}, step {state['step']}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["loss_scaler"])
        if state.get("scaling") is not None:  # delayed-scaling amax histories
            load_scaling_state_dict(self.model, state["scaling"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        clock = state.get("clock") or {"train_time_s": state.get("train_time_s", 0.0)}
        self.clock.load_state_dict(clock)
        return state


def build(cfg: TrainConfig, run_dir: Path, say) -> Session:
    """Data, model (converted to the recipe), optimizer, schedule and loss scaler of ``cfg``.

    The session's wall clock starts here, so wall time includes data and model set-up."""
    clock = Clock()
    run = cfg.run
    device = resolve_device(run.device)
    t0 = time.perf_counter()
    data = prepare_data(cfg.data)
    require_tokens(data, run.seq_len)
    say(f"data: {len(data.train):,} train / {len(data.val):,} val tokens, vocab "
        f"{data.vocab_size} ({time.perf_counter() - t0:.1f} s) in {data.path}")  # fmt: skip
    model_cfg = cfg.model.build()
    if "vocab_size" not in cfg.model.overrides:  # the model's vocab follows the tokenizer's
        over = {**cfg.model.overrides, "vocab_size": data.vocab_size}
        cfg = cfg.replace(model=ModelSection(cfg.model.preset, over))
        model_cfg = cfg.model.build()
    elif model_cfg.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size {model_cfg.vocab_size} < the tokenizer's {data.vocab_size}"
        )
    recipe = cfg.recipe.build()
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    model = Transformer(model_cfg).to(device)
    if recipe.quantized:
        model = convert_model(model, recipe, compile_quantize=run.compile_quantize)
    # on the model that will run, i.e. after the conversion (in place: the blocks the
    # Transformer checkpoints at each forward are the converted ones)
    model.set_activation_checkpointing(run.activation_checkpointing)
    report = getattr(model, "mxfp8_report", None)
    n_mx = len(report.converted) if report is not None else 0
    ac = "" if run.activation_checkpointing == "none" else "; activation checkpointing: block"
    say(f"model: {cfg.model.preset}, {model.num_params():,} parameters; recipe "
        f"{recipe.name}: {n_mx} linear layers quantized{ac}")  # fmt: skip
    odd = {n: r for n, r in (report.kept.items() if report else ()) if "multiple of" in r}
    if odd:  # said even without progress output: the user asked for a quantized run
        name, why = next(iter(odd.items()))
        print(f"mxfp8 train: warning: {len(odd)} linear layer(s) stay in high precision because "
              f"a dim is not a multiple of the recipe's block size (e.g. {name}: {why})",
              file=sys.stderr)  # fmt: skip
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule(optimizer, cfg.schedule, total=run.steps)
    mode = cfg.loss_scale.enabled
    scaling_on = mode is LossScaleMode.ON or (
        mode is LossScaleMode.AUTO and bool(recipe.dynamic_loss_scaling)
    )
    val = eval_batches(data, batch_size=run.batch_size, seq_len=run.seq_len,
                       n_batches=run.eval_batches)  # fmt: skip
    return Session(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        data=data,
        model=model,
        recipe=recipe,
        optimizer=optimizer,
        schedule=schedule,
        scaler=LossScaler(cfg.loss_scale, enabled=scaling_on),
        val_batches=val,
        named_params=list(model.named_parameters()),
        clip_thresholds=cfg.optim.module_thresholds(),
        clock=clock,
    )
