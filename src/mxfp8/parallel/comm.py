"""The process group of a job, and the few cross-rank agreements the training loop needs.

Every decision a rank takes alone would let the replicas drift apart or hang a collective:
the loss that is logged and tested for Inf/NaN, whether to stop, the gradient norm, the
delayed-scaling amaxes. :class:`Comm` gives the loop one call for each; for a process that
is alone (:data:`LOCAL`) every call returns its input, so the single-process path runs no
collective at all and stays bit for bit what it was.

The group is created with a timeout (``parallel.timeout_s``): a rank stuck in a collective
because another one died raises instead of waiting forever (torchrun also tears down the
survivors as soon as one worker exits with an error).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from mxfp8.parallel.env import DistEnv


class Comm:
    """Cross-rank reductions over the default process group (or none: one process)."""

    def __init__(self, env: DistEnv | None = None, device: torch.device | None = None) -> None:
        self.env = env if env is not None else DistEnv()
        # where collective tensors live: CUDA for nccl, CPU for gloo
        self.device = device if device is not None else torch.device("cpu")

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def active(self) -> bool:
        """Whether collectives run (a process group exists with more than one rank)."""
        return self.env.world_size > 1 and dist.is_available() and dist.is_initialized()

    # --- reductions -------------------------------------------------------------------
    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` (sum) in place and return it."""
        if self.active:
            buf = t.to(self.device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            if buf is not t:
                t.copy_(buf)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` (max) in place and return it. NaN wins: a NaN on any rank is a NaN
        everywhere (a plain MAX may drop it, depending on the backend)."""
        if self.active:
            nan = torch.isnan(t).to(torch.float32)
            buf = torch.cat([t.detach().float().reshape(-1), nan.reshape(-1)]).to(self.device)
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)
            n = t.numel()
            vals, nans = buf[:n].cpu(), buf[n:].cpu() > 0
            vals[nans] = float("nan")
            t.copy_(vals.reshape(t.shape).to(t.dtype))
        return t

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks (NaN/Inf on any rank propagate)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        return float(self.sum_(t)[0]) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        return bool(self.sum_(t)[0] > 0)

    def flags(self, flags: Sequence[bool]) -> list[bool]:
        """Element-wise :meth:`any` of several flags in one collective."""
        if not self.active:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags])
        return [bool(v > 0) for v in self.sum_(t)]

    def first(self, obj: Any) -> Any:
        """The first non-None of the ranks' ``obj`` (by rank), on every rank: e.g. the error
        of whichever rank failed, so that all of them raise it."""
        if not self.active:
            return obj
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, obj)
        return next((o for o in everyone if o is not None), None)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


LOCAL = Comm()
"""The communicator of a process that is alone: every reduction returns its input."""


def init_process_group(env: DistEnv, backend: str, device: torch.device,
                       timeout_s: float) -> Comm:  # fmt: skip
    """Join the job's default process group (torchrun's env:// rendezvous) and return its
    :class:`Comm`. On CUDA the process is bound to its device first."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    return Comm(env, device if backend == "nccl" else torch.device("cpu"))


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
