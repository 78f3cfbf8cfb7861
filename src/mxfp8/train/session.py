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

from mxfp8 import checkpoint as ckpt
from mxfp8.checkpoint.resume import ResumeError, check_data_identity
from mxfp8.config.fields import ConfigError
from mxfp8.config.sections import LossScaleMode
from mxfp8.config.train_config import ModelSection, TrainConfig
from mxfp8.data.batches import eval_batches, require_tokens
from mxfp8.data.prepare import PreparedData, prepare_data
from mxfp8.layers.convert import convert_model, scaling_state_dict
from mxfp8.layers.precision import load_layer_state, precision_state_dict
from mxfp8.model.compiled_blocks import CompileMode, compile_blocks
from mxfp8.model.transformer import Transformer
from mxfp8.numerics import backends
from mxfp8.optim.bf16_grads import BF16Grads
from mxfp8.optim.mx_grads import gradient_store
from mxfp8.parallel import (
    LOCAL,
    Comm,
    DistEnv,
    ParallelMode,
    init_process_group,
    resolve_backend,
    resolve_mode,
)
from mxfp8.parallel import dcp as dcp_state
from mxfp8.parallel.wrap import replicate_model, shard_model
from mxfp8.train import init_from
from mxfp8.train.heap import set_mmap_threshold
from mxfp8.train.optim import LossScaler, Schedule, build_optimizer

# steps of each process left out of the steady-state throughput: the first compiles the
# quantizers (tens of seconds on CPU), the second may still meet new shapes
WARMUP_STEPS = 2


def _quantize_kernel(name: str, device: torch.device) -> str | None:
    """``run.quantize_kernel`` for the layers (None: by device), checked here so that a
    kernel this process cannot run fails before the model is built, not at the first step."""
    if name == "auto":
        return None
    try:
        backends.resolve(name, True, device)
    except ValueError as e:
        raise ConfigError(f"run.quantize_kernel = {name}: {e}") from None
    return name


def resolve_device(name: str, env: DistEnv | None = None) -> torch.device:
    """``run.device`` as a device; under torchrun ``auto``/``cuda`` mean this process's GPU
    (``cuda:LOCAL_RANK``)."""
    local = env.local_rank if env is not None and env.distributed else None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local is not None:
        return torch.device("cuda", local)
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
    # how the model is spread over processes; forward_model is what forward runs through
    # (the DDP wrapper, else the model itself); comm does the cross-rank agreements
    mode: ParallelMode = ParallelMode.NONE
    comm: Comm = LOCAL
    forward_model: nn.Module | None = None
    # fixed for the run: computed once here, not at every step
    named_params: list = field(default_factory=list)
    clip_thresholds: tuple = ()
    # optim.grad_dtype = bf16 / mx: where the gradients are held between backward and the step
    grads: BF16Grads | None = None
    step: int = 0
    tokens: int = 0
    clock: Clock = field(default_factory=Clock)

    @property
    def loss_scaling(self) -> bool:
        return self.scaler.enabled

    @property
    def distributed(self) -> bool:
        """Whether the model is wrapped for several processes (DDP or FSDP2): checkpoints
        are then written with torch.distributed.checkpoint."""
        return self.mode is not ParallelMode.NONE

    @property
    def sharded(self) -> bool:
        return self.mode is ParallelMode.FSDP

    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        return rank_rows(x, self.comm)

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
        """The ``state.pt`` of a checkpoint at the current step. A distributed run's optimizer
        state goes to the DCP shards instead (``save_checkpoint(..., optimizer=...)``); the
        RNG state is rank 0's (training draws no random numbers after the init)."""
        optim = {} if self.distributed else {"optimizer": self.optimizer.state_dict()}
        return {
            "step": self.step,
            **optim,
            "schedule": self.schedule.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "scaling": scaling_state_dict(self.model),
            "precision": precision_state_dict(self.model),  # adaptive switches to bf16
            "rng": ckpt.rng_state(),
            "data": {"seed": self.cfg.run.seed, "next_step": self.step},  # batches: f(seed, step)
            "data_identity": self.data_identity(),
            "tokens": self.tokens,
            "clock": self.clock.state_dict(),
            **extra,
        }

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Restore weights and state from ``checkpoint``; returns its ``state.pt`` dict."""
        state = self._load_weights_and_optimizer(checkpoint)
        check_data_identity(state.get("data_identity"), self.data_identity())
        seed = self.cfg.run.seed
        if state["data"] != {"seed": seed, "next_step": state["step"]}:
            raise ResumeError(
                f"checkpoint {checkpoint} was written at data position {state['data']}, but "
                f"this run would continue at seed {seed}, step {state['step']}"
            )
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["loss_scaler"])
        load_layer_state(self.model, state)  # delayed-scaling histories, adaptive switches
        ckpt.set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        clock = state.get("clock") or {"train_time_s": state.get("train_time_s", 0.0)}
        self.clock.load_state_dict(clock)
        return state

    def _load_weights_and_optimizer(self, checkpoint: Path) -> dict[str, Any]:
        """Weights and optimizer state from either layout into this session's model, whatever
        the world size either was written or is run at (find_start verified the checkpoint);
        returns ``state.pt``."""
        if ckpt.is_sharded(checkpoint):  # DCP: reshards onto any world size, one process too
            state = ckpt.load_state(checkpoint, verify=False)
            try:
                dcp_state.load_sharded(checkpoint, self.model, self.optimizer)
            except Exception as e:  # DCP says "missing key"/"size mismatch" in many ways
                raise ckpt.CheckpointError(
                    f"{checkpoint}: its sharded model/optimizer state does not fit this run "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from e
            return state
        if not self.distributed:
            state = ckpt.load_checkpoint(checkpoint, self.model, verify=False)
            self.optimizer.load_state_dict(state["optimizer"])
            return state
        # a single-process checkpoint into a sharded / replicated model: full tensors on
        # every rank, each keeps its part
        state = ckpt.load_state(checkpoint, verify=False)
        weights = ckpt.read_weights(checkpoint, self.model)
        dcp_state.load_full(self.model, self.optimizer, weights, state["optimizer"])
        return state


def rank_rows(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """This rank's disjoint slice of a global batch (rows ``rank*n : (rank+1)*n``); all of it
    for one process."""
    world = comm.world_size
    if world == 1:
        return x
    n = x.shape[0] // world
    return x[comm.rank * n : (comm.rank + 1) * n]


def _quiet(text: str) -> None:
    del text


def build(cfg: TrainConfig, run_dir: Path, say, *, fresh: bool = True) -> Session:
    """Data, model (converted to the recipe), optimizer, schedule and loss scaler of ``cfg``.

    The session's wall clock starts here, so wall time includes data and model set-up.
    ``fresh``: the run starts at step 0 (no checkpoint to load), so ``run.init_from``'s
    weights are loaded."""
    clock = Clock()
    cfg, pretrained = init_from.apply(cfg, fresh=fresh, say=say)
    run = cfg.run
    env = DistEnv.from_environ()
    device = resolve_device(run.device, env)
    try:
        mode = resolve_mode(cfg.parallel.mode, env.world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mode is not ParallelMode.NONE and not env.distributed:  # not started by torchrun
        say(f"parallel.mode = {mode.value} without torchrun: training in this one process")
        mode = ParallelMode.NONE
    if mode is not ParallelMode.NONE and run.compile is CompileMode.MODEL:
        raise ConfigError(f"run.compile = model with parallel.mode = {mode.value}: whole-model "
                          "compilation is not supported in distributed runs (compile each "
                          "block: run.compile = block)")  # fmt: skip
    if run.batch_size % env.world_size:
        raise ConfigError(
            f"run.batch_size = {run.batch_size} sequences cannot be split evenly over "
            f"{env.world_size} processes: use a batch size that is a multiple of {env.world_size}"
        )
    comm = LOCAL
    if mode is not ParallelMode.NONE:
        try:
            backend = resolve_backend(cfg.parallel.backend, device.type)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        comm = init_process_group(env, backend, device, cfg.parallel.timeout_s)
    if not comm.is_main:  # rank 0 speaks for the job
        say = _quiet
    t0 = time.perf_counter()
    if not comm.is_main:  # rank 0 tokenizes into the shared cache, the others then map it
        comm.barrier()
    data = prepare_data(cfg.data)
    if comm.is_main:
        comm.barrier()
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
    if recipe.adaptive and comm.world_size > 1:
        raise ConfigError(
            "recipe.adaptive is single-process for now (its decisions are taken "
            "on rank 0's telemetry and not yet broadcast); run it in one process"
        )
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    model = Transformer(model_cfg)
    if pretrained is not None:
        init_from.load_weights(model, pretrained)
    model = model.to(device)
    if recipe.quantizes_any:
        kernel = _quantize_kernel(run.quantize_kernel, device)
        model = convert_model(model, recipe, compile_quantize=run.compile_quantize,
                              quantize_kernel=kernel)  # fmt: skip
    # on the model that will run, i.e. after the conversion (in place: the blocks the
    # Transformer checkpoints at each forward are the converted ones)
    model.set_activation_checkpointing(run.activation_checkpointing)
    model.set_loss_chunk(run.loss_chunk)
    model.set_compact_activations(run.compact_activations, compiled=run.compile_quantize)
    if run.compile is CompileMode.BLOCK:  # before any sharding (fully_shard after compile)
        try:
            compile_blocks(model, device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    report = getattr(model, "mxfp8_report", None)
    n_mx = len(report.converted) if report is not None else 0
    ac = "" if run.activation_checkpointing == "none" else "; activation checkpointing: block"
    ac += "" if run.compile is CompileMode.NONE else f"; torch.compile: {run.compile.value}"
    say(f"model: {cfg.model.preset}, {model.num_params():,} parameters; recipe "
        f"{recipe.name}: {n_mx} linear layers quantized{ac}")  # fmt: skip
    savers = (
        [f"saved as MX: {', '.join(run.compact_activations)}"] if run.compact_activations else []
    )
    savers += [f"loss in chunks of {run.loss_chunk} tokens"] if run.loss_chunk else []
    savers += [f"AdamW states {cfg.optim.states}"] if cfg.optim.states != "fp32" else []
    savers += [f"gradients {cfg.optim.grad_dtype}"] if cfg.optim.grad_dtype != "fp32" else []
    why_not = set_mmap_threshold(run.mmap_threshold_kib)
    if why_not:
        say(why_not)
    elif run.mmap_threshold_kib:
        savers += [f"glibc mmap threshold {run.mmap_threshold_kib} KiB"]
    if savers:
        say(f"memory ({run.memory.value}): " + "; ".join(savers))
    odd = {n: r for n, r in (report.kept.items() if report else ()) if "multiple of" in r}
    if (
        odd and comm.is_main
    ):  # said even without progress output: the user asked for a quantized run
        name, why = next(iter(odd.items()))
        print(f"mxfp8 train: warning: {len(odd)} linear layer(s) stay in high precision because "
              f"a dim is not a multiple of the recipe's block size (e.g. {name}: {why})",
              file=sys.stderr)  # fmt: skip
    forward_model = model
    if mode is ParallelMode.FSDP:
        shard_model(model, list(model.layers), param_dtype=cfg.parallel.param_dtype,
                    reshard_after_forward=cfg.parallel.reshard_after_forward)  # fmt: skip
    elif mode is ParallelMode.DDP:
        forward_model = replicate_model(model, device)
    if comm.world_size > 1:
        say(f"parallel: {mode.value} over {comm.world_size} processes, "
            f"{run.batch_size // comm.world_size} sequences per rank and micro-batch")  # fmt: skip
    optimizer = build_optimizer(model, cfg.optim)  # after sharding: over this rank's shards
    schedule = Schedule(optimizer, cfg.schedule, total=run.steps)
    scale_mode = cfg.loss_scale.enabled
    scaling_on = scale_mode is LossScaleMode.ON or (
        scale_mode is LossScaleMode.AUTO and bool(recipe.dynamic_loss_scaling)
    )
    val = eval_batches(data, batch_size=run.batch_size, seq_len=run.seq_len,
                       n_batches=run.eval_batches)  # fmt: skip
    # each rank evaluates its slice; the loop averages over the ranks
    val = [(rank_rows(x, comm), rank_rows(y, comm)) for x, y in val]
    named_params = list(model.named_parameters())
    # one process: each gradient taken as autograd accumulates it; else after the reduction
    grads = gradient_store(named_params, cfg.optim.grad_dtype, hooks=mode is ParallelMode.NONE)
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
        mode=mode,
        comm=comm,
        forward_model=forward_model,
        named_params=named_params,
        clip_thresholds=cfg.optim.module_thresholds(),
        grads=grads,
        clock=clock,
    )
