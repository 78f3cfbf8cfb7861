"""Spreading a model over the ranks: FSDP2 (``fully_shard``) or DDP, and what the MX layers
must do under each.

FSDP2 wraps each transformer block, then the root (embeddings, final norm, LM head). Between
uses a rank holds 1/world of every parameter (fp32 master), of its gradient and of its AdamW
moments. Before a block runs, FSDP2 all-gathers its parameters in ``param_dtype`` (bf16 by
default, half the traffic of fp32); the MX layers quantize the *gathered* weight along each
GEMM's axis, exactly as one process quantizes its weight of the same values (the shard
boundaries never enter the blocks). Gradients are reduce-scattered in fp32.

The MX weight cache is turned off under FSDP2: inside a step window it would keep the FP8
copies of every layer's *full* weight until the optimizer step, two bytes per parameter
per rank, more than the rank's shard of the fp32 master at 8 ranks and more. Each forward
quantizes the gathered weight instead, and its backward quantizes the re-gathered one (with
``reshard_after_forward`` the gathered weight is freed after forward and gathered again for
backward; nothing the MX layers save pins it, they save the weight tensor itself, as
``nn.Linear`` does).

DDP replicates the whole model; gradients are averaged by all-reduce (fp32); the MX layers
are unchanged, weight cache included.
"""

from __future__ import annotations

import torch
from torch import nn

from mxfp8.layers.linear import MXLinear
from mxfp8.parallel.env import ParamDtype


def shard_model(model: nn.Module, blocks: list[nn.Module], *, param_dtype: ParamDtype | str,
                reshard_after_forward: bool) -> nn.Module:  # fmt: skip
    """Apply FSDP2 to each of ``blocks`` and then to ``model`` (in place; returns ``model``).

    MixedPrecisionPolicy: parameters gathered and computed in ``param_dtype`` (bf16, or the
    fp32 masters), gradients reduced in fp32. The root keeps its parameters gathered after
    forward (the LM head is the first thing backward needs).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = torch.bfloat16 if ParamDtype(param_dtype) is ParamDtype.BF16 else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, MXLinear):
            m.cache_weights = False  # see the module docstring
    return model


def replicate_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)``: the wrapper to run forward through (gradients are
    all-reduced in backward); ``model`` itself stays what checkpoints and the MX layers see."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # no buffer broadcast: the model's only buffers are the RoPE tables, equal on every rank
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def reduce_delayed_amax(model: nn.Module, comm) -> None:
    """Make the pending delayed-scaling amaxes of every per-tensor layer the max over the
    ranks (as TransformerEngine reduces its amax history), so every rank commits the same
    history and uses one scale. A no-op for one process or a model without delayed scaling.
    Every rank must call it at the same point (end of each step window)."""
    if not comm.active:
        return
    slots = []
    for m in model.modules():
        state = getattr(m, "delayed_state", None) if isinstance(m, MXLinear) else None
        if state is None:
            continue
        for op in sorted(state.pending):
            slots.append((state, op))
    if not slots:
        return
    values = torch.stack([s.pending[op].reshape(()).float() for s, op in slots])
    comm.max_(values)
    for (s, op), v in zip(slots, values, strict=True):
        s.pending[op] = v.clone()
