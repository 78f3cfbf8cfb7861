"""Multi-process training on torch.distributed: torchrun's environment, the process group
and the cross-rank agreements (:mod:`~mxfp8.parallel.comm`), FSDP2 / DDP wrapping
(:mod:`~mxfp8.parallel.wrap`) and DCP state that reshards (:mod:`~mxfp8.parallel.dcp`).

A floor beside ``train/``: it knows the layers (the MX weight cache, delayed scaling) but not
the training loop, which calls it. docs/distributed.md is the user's guide.
"""

from mxfp8.parallel.comm import LOCAL, Comm, destroy_process_group, init_process_group
from mxfp8.parallel.env import (
    Backend,
    DistEnv,
    ParallelMode,
    ParamDtype,
    resolve_backend,
    resolve_mode,
)

__all__ = [
    "LOCAL",
    "Backend",
    "Comm",
    "DistEnv",
    "ParallelMode",
    "ParamDtype",
    "destroy_process_group",
    "init_process_group",
    "resolve_backend",
    "resolve_mode",
]
