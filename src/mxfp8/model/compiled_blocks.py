"""Transformer blocks under ``torch.compile`` (``run.compile = block``, torchtitan's pattern).

Each block is compiled in place (``nn.Module.compile``): its state-dict keys do not change,
FSDP2 can shard it afterwards, and activation checkpointing wraps it from outside, so the
replay in backward runs the same compiled graph as the forward did (a checkpointed compiled
run equals the plain compiled run bit for bit; tested). Blocks of one shape and recipe share
one graph: the MX layers' plans are made before the first trace (:func:`compile_blocks`), so
no block's guards differ from another's, and nothing recompiles after the first step. The
graphs handed to the compiler are counted (:data:`GRAPHS`) so the loop can report them and a
test can pin them.

What sits outside the compiled region, by design:

- **telemetry observers** (Python callbacks on the MX layers): a block whose layers have an
  observer set runs eagerly for that forward (``torch.compiler.set_stance("force_eager")``),
  so the observer sees the operands; every kernel gives the same bits, so the numbers are
  those of the compiled path (the operands are tested bit for bit);
- **the step window's weight cache and the shared-input slot**: the MX layers skip both when
  traced (each micro-batch quantizes its weights again, as outside a window);
- **inference with a KV cache** (``generate``): the cache is a Python object updated in
  place, so those forwards run eagerly;
- **recipes whose layers do not trace** are refused with the reason (:func:`untraceable`):
  per-tensor and row-wise FP8 keep scaling state in Python and run eagerly inside a compiled
  block (a graph break per linear), MX attention BMMs likewise, 2-D weight tiles make dynamo
  fail on data-dependent sizes, and adaptive precision switches a layer's recipe mid-run,
  which would recompile its block at each switch.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn

GRAPHS = {"block": 0}  # graphs the compiler has been handed for transformer blocks


class CompileMode(enum.StrEnum):
    """What ``torch.compile`` covers in training (``run.compile``).

    - ``none``: nothing (the MX quantizers alone may still be compiled: run.compile_quantize);
    - ``block``: each transformer block, in place (this module);
    - ``model``: the whole model's forward (no checkpointing, no distributed).

    ``true`` / ``false`` (the former boolean option) read as ``model`` / ``none``.
    """

    NONE = "none"
    BLOCK = "block"
    MODEL = "model"

    @classmethod
    def _missing_(cls, value: object) -> CompileMode | None:
        if value is True or str(value).lower() == "true":
            return cls.MODEL
        if value is False or str(value).lower() == "false":
            return cls.NONE
        return None

    @classmethod
    def parse(cls, mode: Any) -> CompileMode:
        try:
            return cls(mode)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {valid}") from None


def _counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
    """Inductor, counting the graphs it is handed for blocks."""
    from torch._inductor.compile_fx import compile_fx

    GRAPHS["block"] += 1
    return compile_fx(gm, example_inputs)


def untraceable(model: nn.Module) -> list[str]:
    """Why the blocks of ``model`` cannot be compiled as one graph each (empty: they can)."""
    from mxfp8.layers.linear import MXLinear
    from mxfp8.layers.recipe import ScalingKind, WeightBlock

    why: set[str] = set()
    for block in model.layers:
        for m in block.modules():
            if getattr(m, "bmm_recipe", None) is not None:
                why.add("MX attention BMMs (quantize_attention_bmm) run eagerly: a graph break "
                        "per block")  # fmt: skip
            if not isinstance(m, MXLinear):
                continue
            r = m.recipe
            if r.scaling is not ScalingKind.MX and r.scaling is not ScalingKind.NONE:
                why.add(f"{r.scaling.value} FP8 scaling keeps its scale state in Python and "
                        "runs eagerly: a graph break per linear")  # fmt: skip
            if r.scaling is ScalingKind.MX and r.weight_block is WeightBlock.TILE:
                why.add("32x32 weight tiles do not trace (data-dependent sizes)")
            if r.adaptive:
                why.add("adaptive precision switches layers to bf16 during the run, and each "
                        "switch would recompile its block")  # fmt: skip
    return sorted(why)


def compile_blocks(model: nn.Module, device: torch.device) -> None:
    """Compile each of ``model.layers`` in place; a ValueError says why a model's blocks
    cannot be (:func:`untraceable`). The MX layers' plans for every compute dtype are made
    first, so the blocks trace with identical guards."""
    why = untraceable(model)
    if why:
        raise ValueError("run.compile = block is not available for this recipe: "
                         + "; ".join(why))  # fmt: skip
    prepare_plans(model.layers, device)
    for block in model.layers:
        block.compile(backend=_counting_backend)


def prepare_plans(module: nn.Module, device: torch.device) -> None:
    """Make the plans of the MX layers in ``module`` before it is traced (whole-model
    compilation needs this too: without it the second step recompiled the model)."""
    for m in module.modules():
        prepare = getattr(m, "prepare_plans", None)
        if prepare is not None:
            prepare(device)


def is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


def observed(block: nn.Module) -> bool:
    """Whether a layer of ``block`` has a telemetry observer set (it must run eagerly)."""
    return any(getattr(m, "observer", None) is not None for m in block.modules())


class EagerCall:
    """``block(*args)`` with the compiler set aside (``set_stance("force_eager")``). Chosen
    once per forward, so that a checkpoint's replay runs the way its forward ran."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, *args: Any) -> torch.Tensor:
        with torch.compiler.set_stance("force_eager"):
            return self.block(*args)


def block_call(block: nn.Module, *, force_eager: bool = False) -> Any:
    """What the model calls for ``block``: the block itself, or an :class:`EagerCall` of it
    when it is compiled and observed (or ``force_eager``)."""
    if is_compiled(block) and (force_eager or observed(block)):
        return EagerCall(block)
    return block
