"""Which checkpoint a command means: ``mxfp8 eval RUN``, ``mxfp8 export RUN --step N`` or a
checkpoint directory itself, verified against its manifest."""

from __future__ import annotations

from pathlib import Path

from mxfp8.checkpoint.manifest import MANIFEST_FILE, STATE_FILE, verify_checkpoint
from mxfp8.checkpoint.write import (
    CHECKPOINT_DIR,
    latest_intact_checkpoint,
    list_checkpoints,
    step_dir_name,
)
from mxfp8.errors import UserError


def find_checkpoint(path: Path, step: int | None) -> Path:
    """The checkpoint directory meant by ``path`` (and ``--step``), verified."""
    if (path / MANIFEST_FILE).is_file() or (path / STATE_FILE).is_file():
        if step is not None:
            raise UserError(f"{path} is a checkpoint directory: --step applies to a run directory")
        verify_checkpoint(path)
        return path
    if step is not None:
        found = Path(path) / CHECKPOINT_DIR / step_dir_name(step)
        if not found.is_dir():
            have = [p.name for p in list_checkpoints(path)]
            raise UserError(f"{path} has no checkpoint of step {step} (it has: "
                            f"{', '.join(have) or 'none'})")  # fmt: skip
        verify_checkpoint(found)
        return found
    found, skipped = latest_intact_checkpoint(path)
    if found is None:
        why = f" ({len(skipped)} damaged)" if skipped else ""
        raise UserError(f"{path}: no intact checkpoint{why}: not a run directory with checkpoints")
    return found
