"""The plain sections of the run config: optimizer, schedule, loss scaling, run.

Each field carries its help text (``opt(default, help)``); ``mxfp8 train --help`` and the
TOML files are generated from these classes. They are re-exported by
:mod:`mxfp8.config.train_config`, which composes them into ``TrainConfig``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

from mxfp8.config.fields import ConfigError, opt
from mxfp8.layers.compact_activations import CompactSaved
from mxfp8.model.compiled_blocks import CompileMode
from mxfp8.model.transformer import ActivationCheckpointing
from mxfp8.parallel.env import Backend, ParallelMode, ParamDtype


class ScheduleKind(enum.StrEnum):
    """Learning-rate schedule, as a multiplier m(s) of the peak lr at step s (0-based).

    - ``warmup-cosine``: m = (s+1)/W during warmup, then
      r + (1-r) * (1 + cos(pi * p)) / 2 with p the fraction of the post-warmup steps done
      and r = ``min_lr_ratio``.
    - ``constant``: linear warmup, then m = 1.
    - ``wsd`` (warmup-stable-decay): warmup, m = 1, then a linear decay to r over the last
      ``decay_fraction`` of the run.
    """

    WARMUP_COSINE = "warmup-cosine"
    CONSTANT = "constant"
    WSD = "wsd"


class LossScaleMode(enum.StrEnum):
    """Dynamic loss scaling: ``auto`` (on when the recipe needs it), ``on`` or ``off``."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with fp32 master weights, and gradient clipping."""

    lr: float = opt(3e-3, "peak learning rate")
    betas: tuple[float, float] = opt((0.9, 0.95), "AdamW (beta1, beta2)")
    eps: float = opt(1e-8, "AdamW epsilon")
    weight_decay: float = opt(0.1, "decoupled weight decay (not applied to norms and biases)")
    decay_embeddings: bool = opt(
        True,
        "apply weight decay to the embedding table too (it is a matrix like the others, and "
        "with tied embeddings it is also the LM head)",
    )
    grad_clip: float = opt(1.0, "max global gradient norm; 0 disables global clipping")
    clip_modules: tuple[str, ...] = opt(
        (),
        "per-module clipping, entries 'FQN_PATTERN=MAX_NORM' (fnmatch on parameter names, "
        "applied before the global clip), e.g. 'layers.*.attention.*=0.5'",
    )
    states: Literal["fp32", "bf16", "fp8"] = opt(
        "fp32",
        "how AdamW stores its two moments (the update math is fp32 either way, on fp32 master "
        "weights): fp32; bf16 (half the memory); fp8 (a quarter: E4M3 codes with one E8M0 "
        "scale per 32 along the last dim for m, v in bf16; vectors and matrices whose last dim "
        "is not a multiple of 32 keep fp32 moments)",
    )
    bf16_states: bool = opt(False, "former spelling of states = 'bf16' (still read)")
    grad_dtype: Literal["fp32", "bf16", "mx"] = opt(
        "fp32",
        "how gradients are held between backward and the optimizer step: bf16 halves them "
        "(each is converted as it is accumulated); mx holds each matrix whose last dim is a "
        "multiple of 32 as E4M3 codes with one E8M0 scale per 32 (about a quarter of fp32), "
        "the rest in bf16, and accumulates micro-batches in bf16 (the norm that is clipped is "
        "the fp32 gradients'). The update is fp32 on fp32 master weights either way",
    )

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr must be > 0", self.lr)
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas must be in [0, 1)", self.betas)
        _check(self.eps > 0, "optim.eps must be > 0", self.eps)
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0", self.weight_decay)
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0", self.grad_clip)
        _check(self.states in ("fp32", "bf16", "fp8"), "optim.states must be fp32, bf16 or fp8",
               self.states)  # fmt: skip
        _check(self.grad_dtype in ("fp32", "bf16", "mx"),
               "optim.grad_dtype must be fp32, bf16 or mx", self.grad_dtype)  # fmt: skip
        if self.bf16_states and self.states == "fp8":
            raise ConfigError(
                "optim.bf16_states = true (the former spelling of optim.states = 'bf16') "
                "contradicts optim.states = 'fp8': set only optim.states"
            )
        if self.bf16_states:  # an old config: the same run as states = 'bf16', written so
            object.__setattr__(self, "states", "bf16")
            object.__setattr__(self, "bf16_states", False)
        self.module_thresholds()  # validates the entries

    def module_thresholds(self) -> tuple[tuple[str, float], ...]:
        """``clip_modules`` parsed into (pattern, max_norm) pairs."""
        out = []
        for entry in self.clip_modules:
            pattern, sep, value = entry.rpartition("=")
            try:
                norm = float(value)
            except ValueError:
                norm = -1.0
            if not sep or not pattern or not norm > 0:
                raise ConfigError(
                    f"optim.clip_modules entry {entry!r} must look like 'PATTERN=MAX_NORM' "
                    "with MAX_NORM > 0"
                )
            out.append((pattern, norm))
        return tuple(out)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule over the planned ``run.steps``."""

    kind: ScheduleKind = opt(ScheduleKind.WARMUP_COSINE, "warmup-cosine, constant or wsd")
    warmup_steps: int = opt(4, "linear warmup steps (clamped to the run length)")
    min_lr_ratio: float = opt(0.1, "floor of the decay, as a fraction of the peak lr")
    decay_fraction: float = opt(0.2, "wsd only: fraction of the run spent decaying")

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "schedule.warmup_steps must be >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]",
               self.min_lr_ratio)  # fmt: skip
        _check(0 <= self.decay_fraction <= 1, "schedule.decay_fraction must be in [0, 1]",
               self.decay_fraction)  # fmt: skip


@dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling (needed by per-tensor FP8 recipes; available to all)."""

    enabled: LossScaleMode = opt(LossScaleMode.AUTO, "auto (when the recipe needs it), on, off")
    init_scale: float = opt(2.0**16, "initial loss scale")
    growth_interval: int = opt(1000, "multiply the scale by growth_factor after N clean steps")
    growth_factor: float = opt(2.0, "growth factor (a power of two keeps scaling exact)")
    backoff_factor: float = opt(0.5, "factor applied on a step with Inf/NaN gradients")
    min_scale: float = opt(2.0**-16, "the scale never backs off below this")

    def __post_init__(self) -> None:
        _check(self.init_scale > 0, "loss_scale.init_scale must be > 0", self.init_scale)
        _check(self.growth_interval >= 1, "loss_scale.growth_interval must be >= 1",
               self.growth_interval)  # fmt: skip
        _check(self.growth_factor >= 1, "loss_scale.growth_factor must be >= 1",
               self.growth_factor)  # fmt: skip
        _check(0 < self.backoff_factor < 1, "loss_scale.backoff_factor must be in (0, 1)",
               self.backoff_factor)  # fmt: skip
        _check(self.min_scale > 0, "loss_scale.min_scale must be > 0", self.min_scale)


@dataclass(frozen=True)
class ParallelConfig:
    """Multi-process training under torchrun (docs/distributed.md); ignored by one process."""

    mode: ParallelMode = opt(
        ParallelMode.AUTO,
        "auto (fsdp with more than one process, else none), none, ddp (every rank holds the "
        "model; gradients all-reduced) or fsdp (FSDP2 fully_shard of each block and the root: "
        "parameters, gradients and AdamW states sharded)",
    )
    backend: Backend = opt(Backend.AUTO, "auto (nccl on CUDA, gloo on CPU), nccl or gloo")
    reshard_after_forward: bool = opt(
        True,
        "fsdp: free each block's gathered weights after its forward and gather them again "
        "for backward (less memory, one more all-gather per block)",
    )
    param_dtype: ParamDtype = opt(
        ParamDtype.BF16,
        "fsdp: the dtype weights are all-gathered and computed in: bf16 (half the traffic; "
        "MX copies are quantized from bf16-rounded weights) or fp32 (the master weights: "
        "every quantized copy equals a single process's bit for bit)",
    )
    timeout_s: float = opt(
        600.0,
        "collective timeout, seconds: a rank that waits longer for the others (one died or "
        "hangs) fails instead of waiting forever",
    )

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, "parallel.timeout_s must be > 0", self.timeout_s)


class MemoryProfile(enum.StrEnum):
    """``run.memory``: a bundle of memory savers, applied where the config is loaded."""

    DEFAULT = "default"
    LEAN = "lean"


# What ``run.memory = "lean"`` sets, as "section.field": value, where the config does not set
# that field itself (mxfp8.config.train_config applies it). Which savers are in, and why the
# others are not, is measured in docs/performance.md and docs/results.md.
LEAN_PROFILE: dict[str, Any] = {
    "run.compact_activations": ["norm", "swiglu", "attention-out"],
    "run.loss_chunk": 1024,
    "optim.states": "fp8",
    "optim.grad_dtype": "bf16",
}


@dataclass(frozen=True)
class RunConfig:
    """Length, batch shape, logging, evaluation and checkpoint cadence of a run."""

    steps: int = opt(120, "planned number of optimizer steps; the schedule spans them")
    batch_size: int = opt(
        8,
        "sequences per micro-batch, over all processes (each of N ranks takes a disjoint "
        "slice of batch_size / N): the batch does not depend on the world size",
    )
    seq_len: int = opt(128, "tokens per sequence")
    grad_accum: int = opt(1, "micro-batches per optimizer step (ignored if tokens_per_step)")
    tokens_per_step: int = opt(
        0, "tokens per optimizer step; if > 0, grad_accum = tokens_per_step / (batch * seq_len)"
    )
    seed: int = opt(0, "seed of the model init and the data order")
    out: str = opt("", "run directory; empty = runs/<recipe>-<timestamp>")
    resume: bool | Literal["auto"] = opt(
        False,
        "true: continue from the latest checkpoint in `out`; auto: the same command for every "
        "launch of a job (start the run when `out` holds none, or only a start-up crash's "
        "leftovers; continue it when `out` holds it; refuse another run)",
    )
    stop_after: int = opt(0, "end this process after K steps, with a checkpoint (0 = never)")
    log_every: int = opt(5, "write metrics every N steps")
    eval_every: int = opt(40, "validate every N steps and at the end (0 = only at the end)")
    eval_batches: int = opt(4, "validation batches per evaluation")
    ckpt_every: int = opt(0, "checkpoint every N steps (0 = only at the end / at stop_after)")
    keep_last: int = opt(2, "checkpoints kept on disk (older ones are deleted)")
    compile: CompileMode = opt(
        CompileMode.NONE,
        "torch.compile in training: none; block (each transformer block compiled in place, "
        "torchtitan's pattern: composes with activation checkpointing; MX recipes whose "
        "layers trace, docs/performance.md); model (the whole model: no checkpointing, no "
        "distributed). true/false, the former spelling, read as model/none",
    )
    compile_quantize: bool = opt(
        True, "torch.compile only the MX quantizers (fast on CPU; the first step compiles)"
    )
    quantize_kernel: str = opt(
        "auto",
        "the MX quantization kernel: auto (with compile_quantize: the two-pass cpu kernel on "
        "CPU, inductor on CUDA; without it: eager), eager, inductor, cpu, or triton (needs "
        "mxfp8[gpu]; not yet measured on a GPU); all give the same bits",
    )
    activation_checkpointing: ActivationCheckpointing = opt(
        ActivationCheckpointing.NONE,
        "none, or block: keep only each transformer block's input in the forward pass and "
        "recompute the block in backward; cuts activation memory to about one tensor per "
        "block for roughly one more forward pass of compute; results are bit-identical "
        "(not available with run.compile = model)",
    )
    loss_chunk: int = opt(
        0,
        "compute the LM head and the loss of each training micro-batch this many tokens at a "
        "time, so the [tokens, vocab] fp32 logits and their gradient never exist whole (0 = "
        "all at once); the same loss and gradients up to the rounding of the head's GEMMs "
        "(docs/performance.md); evaluation computes them at once",
    )
    compact_activations: tuple[str, ...] = opt(
        (),
        "non-linear activations saved for backward as MX (FP8 codes + E8M0 scales), any of "
        "norm (the RMSNorm inputs), swiglu (the SwiGLU inputs) and attention (SDPA's q, k, v; "
        "SDPA recomputed in backward); the forward is unchanged, the gradients are taken at "
        "the MX of those tensors (docs/performance.md). attention-out: SDPA's output is not "
        "saved but recomputed from q, k, v (exact)",
    )
    memory: MemoryProfile = opt(
        MemoryProfile.DEFAULT,
        "default, or lean: a profile of memory savers (docs/performance.md; its loss against "
        "mxfp8: docs/results.md), applied unless the config sets that field itself: "
        + ", ".join(f"{k} = {v!r}" for k, v in LEAN_PROFILE.items()),
    )
    mmap_threshold_kib: int = opt(
        0,
        "CPU runs on Linux: fix glibc's mmap threshold at this many KiB, so that freed large "
        "tensors go back to the system instead of staying in the heap (peak RSS follows the "
        "live tensors, at the cost of page faults: measured 1.7x lean's step time); 0 = "
        "glibc's dynamic default; 256 is what docs/performance.md measured. Changes no number "
        "(mxfp8.train.heap)",
    )
    init_from: str = opt(
        "",
        "start from the weights of a Llama directory (an `mxfp8 export`, or transformers' "
        "save_pretrained): its config.json sets the model shape and its tokenizer.json the "
        "tokenizer (unless data.tokenizer is set); used at step 0, not on resume",
    )
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    telemetry_every: int = opt(0, "numerics telemetry every N steps (0 = off)")
    max_nonfinite_steps: int = opt(
        5,
        "stop after this many consecutive steps skipped for a non-finite loss or gradient "
        "(routine loss-scaling overflows excepted); 0 = never stop",
    )
    progress: bool = opt(True, "show a progress bar on the terminal")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every",
                     "eval_batches", "keep_last"):  # fmt: skip
            _check(getattr(self, name) >= 1, f"run.{name} must be >= 1", getattr(self, name))
        try:  # Python callers may pass a plain string; load_config has coerced already
            mode = ActivationCheckpointing.parse(self.activation_checkpointing)
        except ValueError:
            valid = "|".join(m.value for m in ActivationCheckpointing)
            raise ConfigError(
                f"invalid value {self.activation_checkpointing!r} for "
                f"run.activation_checkpointing (expected {{{valid}}})"
            ) from None
        object.__setattr__(self, "activation_checkpointing", mode)
        try:
            object.__setattr__(self, "memory", MemoryProfile(self.memory))
            CompactSaved.parse_all(self.compact_activations)
        except ValueError as e:
            raise ConfigError(f"run.memory / run.compact_activations: {e}") from None
        try:
            object.__setattr__(self, "compile", CompileMode.parse(self.compile))
        except ValueError as e:
            raise ConfigError(f"run.compile: {e}") from None
        if self.compile is not CompileMode.NONE and self.compact_activations:
            raise ConfigError(
                f"run.compact_activations cannot be combined with run.compile = "
                f"{self.compile.value} yet: its autograd function is not traced by "
                "torch.compile; turn one of them off"
            )
        if self.resume not in (True, False, "auto") or not isinstance(self.resume, bool | str):
            raise ConfigError(
                f"invalid value {self.resume!r} for run.resume (expected true, false or 'auto')"
            )
        kernels = ("auto", "eager", "inductor", "cpu", "triton")
        if self.quantize_kernel not in kernels:
            raise ConfigError(
                f"invalid value {self.quantize_kernel!r} for run.quantize_kernel "
                f"(expected {{{'|'.join(kernels)}}})"
            )
        if self.compile is CompileMode.MODEL and mode is not ActivationCheckpointing.NONE:
            # under torch.compile the compiler recomputes in its own graph, and the numbers
            # moved (bf16, CPU): this option promises they never do, and it is resumable
            raise ConfigError(
                f"run.activation_checkpointing = {mode.value} cannot be combined with "
                "run.compile = model: compiled recomputation is not bit-identical to the "
                "plain run; use run.compile = block (checkpointed from outside) or turn one "
                "of them off"
            )
        for name in ("tokens_per_step", "stop_after", "eval_every", "ckpt_every",
                     "telemetry_every", "max_nonfinite_steps", "loss_chunk",
                     "mmap_threshold_kib"):  # fmt: skip
            _check(getattr(self, name) >= 0, f"run.{name} must be >= 0", getattr(self, name))
        if self.tokens_per_step:
            per_micro = self.batch_size * self.seq_len
            _check(
                self.tokens_per_step % per_micro == 0,
                f"run.tokens_per_step must be a multiple of batch_size * seq_len ({per_micro})",
                self.tokens_per_step,
            )

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step."""
        if self.tokens_per_step:
            return self.tokens_per_step // (self.batch_size * self.seq_len)
        return self.grad_accum


def _check(ok: bool, msg: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{msg}, got {value!r}")
