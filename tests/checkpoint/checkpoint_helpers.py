"""A model with tied weights, and small checkpoints of it, for the checkpoint tests."""

from __future__ import annotations

from torch import nn

from mxfp8 import checkpoint as ckpt


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def _save(run_dir, step, keep_last=3, **state):
    toml = f"# step {step}\n"
    return ckpt.save_checkpoint(
        run_dir, step, model=Tied(), state=state, config_toml=toml, keep_last=keep_last
    )


def _leftovers(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))
