"""Checkpoints, the checkpoint API in one place: writing (:mod:`~mxfp8.checkpoint.write`),
reading (:mod:`~mxfp8.checkpoint.read`), the manifest that says whether one is intact
(:mod:`~mxfp8.checkpoint.manifest`), finding the one a command means
(:mod:`~mxfp8.checkpoint.find`) and deciding where a run starts
(:mod:`~mxfp8.checkpoint.resume`, imported on its own: it reads run configs).

``from mxfp8 import checkpoint as ckpt`` gives the names below.
"""

from mxfp8.checkpoint.find import find_checkpoint
from mxfp8.checkpoint.manifest import (
    CONFIG_FILE,
    DCP_METADATA,
    MANIFEST_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointWriteError,
    verify_checkpoint,
    write_manifest,
)
from mxfp8.checkpoint.read import (
    is_sharded,
    load_checkpoint,
    load_state,
    read_weights,
    rng_state,
    set_rng_state,
)
from mxfp8.checkpoint.write import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    latest_intact_checkpoint,
    list_checkpoints,
    recover,
    save_checkpoint,
    step_dir_name,
)

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "DCP_METADATA",
    "MANIFEST_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "CheckpointWriteError",
    "find_checkpoint",
    "is_sharded",
    "latest_checkpoint",
    "latest_intact_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_state",
    "read_weights",
    "recover",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "step_dir_name",
    "verify_checkpoint",
    "write_manifest",
]
