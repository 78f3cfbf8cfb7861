"""Model and optimizer state across world sizes, through ``torch.distributed.checkpoint``.

Distributed runs write the model and AdamW state with DCP: every rank writes its own shards
(``__RANK_0.distcp``) and rank 0 the ``.metadata`` that says which slice of which tensor is
where. The state dicts come from ``get_state_dict`` (fully qualified parameter names, the
same with FSDP2, DDP or one process), so a checkpoint written at one world size loads at any
other, one process included (DCP reads without a process group then): DCP reshards on load.

Single-process checkpoints (``model.safetensors`` plus the optimizer's own state dict) load
into a distributed run too: :func:`load_full` gives every rank the full tensors and
``set_state_dict`` keeps each rank's shard.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _api():
    from torch.distributed.checkpoint import state_dict as sd

    return sd


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as DCP saves and loads them (this rank's shards under
    FSDP2, full tensors otherwise). Creates the optimizer's states if it has none yet (a step
    of lr 0, what ``get_state_dict`` does), so a fresh optimizer can receive a checkpoint."""
    sd = _api()
    if optimizer is None:
        return {"model": sd.get_model_state_dict(model)}
    msd, osd = sd.get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's part of the model and optimizer state into ``path`` (every rank of the
    job calls it; the directory is shared)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(path: str | Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None) -> None:  # fmt: skip
    """Load a DCP checkpoint into ``model`` (and ``optimizer``), whatever the world size it was
    written at; without a process group this process reads every shard itself. Raises
    ``RuntimeError``/``ValueError`` from DCP when the checkpoint does not fit the model."""
    import torch.distributed.checkpoint as dcp

    state = sharded_state(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load(state, checkpoint_id=str(path))
    sd = _api()
    if optimizer is None:
        sd.set_model_state_dict(model, state["model"])
    else:
        sd.set_state_dict(model, optimizer, model_state_dict=state["model"],
                          optim_state_dict=state["optim"])  # fmt: skip


def _by_name(optimizer: torch.optim.Optimizer, model: nn.Module,
             state: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """An optimizer state dict keyed by parameter index (``optimizer.state_dict()`` of the
    same parameter groups) rekeyed by parameter name, the form ``set_state_dict`` reads."""
    names = {}
    for name, p in model.named_parameters():  # a tied parameter keeps its first name
        names.setdefault(id(p), name)
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    flat = [i for g in state["param_groups"] for i in g["params"]]
    if len(flat) != len(order):
        raise ValueError(f"the checkpoint's optimizer has {len(flat)} parameters, this model "
                         f"{len(order)}")  # fmt: skip
    index_to_name = dict(zip(flat, order, strict=True))
    groups = [{**g, "params": [index_to_name[i] for i in g["params"]]}
              for g in state["param_groups"]]  # fmt: skip
    return {"state": {index_to_name[i]: s for i, s in state["state"].items()},
            "param_groups": groups}  # fmt: skip


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer,
              weights: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:  # fmt: skip
    """Load full (unsharded) weights and a single-process optimizer state dict into a model
    that may be sharded or replicated; every rank passes the same full tensors."""
    sd = _api()
    sharded_state(model, optimizer)  # the optimizer's states exist: set_state_dict fills them
    options = sd.StateDictOptions(full_state_dict=True, strict=True)
    sd.set_state_dict(model, optimizer, model_state_dict=weights,
                      optim_state_dict=_by_name(optimizer, model, optim_state),
                      options=options)  # fmt: skip


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on CPU, gathered onto rank 0 (``{}`` on the other ranks; every rank
    must call it). One process: the model's own state dict."""
    sd = _api()
    options = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return sd.get_model_state_dict(model, options=options)
