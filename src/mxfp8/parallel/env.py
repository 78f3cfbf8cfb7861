"""Who this process is in a job: torchrun's environment, and the ``[parallel]`` choices.

``torchrun`` (and any launcher that follows its convention, e.g. SLURM via ``srun torchrun``)
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` for each process. Without them a process is alone: rank 0 of 1, and mxfp8
trains exactly as it always has, without creating a process group.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass


class ParallelMode(enum.StrEnum):
    """How the model is spread over the processes."""

    AUTO = "auto"  # fsdp when the world size is above 1, else none
    NONE = "none"  # one process (a world size above 1 is refused)
    DDP = "ddp"  # every rank holds the whole model; gradients are all-reduced
    FSDP = "fsdp"  # FSDP2 fully_shard: parameters, gradients and AdamW states sharded


class Backend(enum.StrEnum):
    """The torch.distributed backend."""

    AUTO = "auto"  # nccl on CUDA, gloo on CPU
    NCCL = "nccl"
    GLOO = "gloo"


class ParamDtype(enum.StrEnum):
    """What FSDP2 all-gathers and computes with (its MixedPrecisionPolicy.param_dtype)."""

    BF16 = "bf16"  # half the traffic; MX copies are quantized from the bf16-rounded weights
    FP32 = "fp32"  # the master weights: every quantized copy equals a single process's


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (torchrun's variables; rank 0 of 1 without them)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether torchrun (or a launcher like it) started this process as part of a job,
        even a job of one process."""
        return self.world_size > 1 or self._launched

    _launched: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read torchrun's variables; raises ``ValueError`` naming a malformed one."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env and "RANK" not in env:
            return cls()
        values = {}
        for name, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0"),
                              ("LOCAL_WORLD_SIZE", None)):  # fmt: skip
            raw = env.get(name, default)
            if raw is None and name == "LOCAL_WORLD_SIZE":
                raw = env.get("WORLD_SIZE")
            if raw is None:
                raise ValueError(f"{name} is not set, but RANK/WORLD_SIZE are: an incomplete "
                                 "torchrun environment")  # fmt: skip
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None
        rank, world = values["RANK"], values["WORLD_SIZE"]
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
        return cls(rank, world, values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"], True)


def resolve_mode(mode: ParallelMode | str, world_size: int) -> ParallelMode:
    """``auto`` -> ``fsdp`` above one process, ``none`` for one; ``ddp``/``fsdp`` stay what
    they are (also for one process: a run can be tested at world size 1 in its mode);
    ``none`` with several processes is a ``ValueError``."""
    mode = ParallelMode(mode)
    if mode is ParallelMode.AUTO:
        return ParallelMode.FSDP if world_size > 1 else ParallelMode.NONE
    if mode is ParallelMode.NONE and world_size > 1:
        raise ValueError(
            f"parallel.mode = none, but this process is one of {world_size} (torchrun): "
            "use parallel.mode = auto, ddp or fsdp, or launch one process"
        )
    return mode


def resolve_backend(backend: Backend | str, device_type: str) -> str:
    """``auto`` -> ``nccl`` on CUDA, ``gloo`` elsewhere; nccl off CUDA is a ``ValueError``."""
    backend = Backend(backend)
    if backend is Backend.AUTO:
        return "nccl" if device_type == "cuda" else "gloo"
    if backend is Backend.NCCL and device_type != "cuda":
        raise ValueError(f"parallel.backend = nccl needs CUDA devices; this run is on "
                         f"{device_type}: use gloo (or auto)")  # fmt: skip
    return backend.value
