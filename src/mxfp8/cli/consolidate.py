"""``mxfp8 consolidate RUN_OR_CHECKPOINT``: the weights of a checkpoint as one
``model.safetensors``.

A distributed run's checkpoints hold the model as DCP shards (one file per rank); the final
one also holds the consolidated file. This command makes it for any checkpoint, in one
process and at any world size the checkpoint was written at: it builds the run's model from
the checkpoint's ``config.toml``, reads every shard into it and writes the weights with
safetensors (a tied embedding stored once), ready for ``mxfp8 quantize-stats`` or an export.
Without ``--out`` the file goes into the checkpoint, whose manifest is then rewritten to
vouch for it. A single-process checkpoint already has the file: it is copied to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mxfp8.checkpoint.find import find_checkpoint


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "consolidate",
        help="write the weights of a (sharded) checkpoint as one model.safetensors",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("path", type=Path, help="a run directory (its newest intact checkpoint) or "
                   "a checkpoint directory (checkpoints/step_N)")  # fmt: skip
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step of RUN")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the file to write (default: model.safetensors in the checkpoint)",
    )
    return p


def consolidate(checkpoint: Path, out: Path | None = None) -> Path:
    """Write ``checkpoint``'s full weights to ``out`` (default: into the checkpoint, whose
    manifest is rewritten); returns the file written."""
    from safetensors.torch import save_model

    from mxfp8 import checkpoint as ckpt
    from mxfp8.checkpoint.manifest import build_manifest
    from mxfp8.config.train_config import load_config
    from mxfp8.fileio import write_text_atomically
    from mxfp8.model.transformer import Transformer

    target = out if out is not None else checkpoint / ckpt.WEIGHTS_FILE
    existing = checkpoint / ckpt.WEIGHTS_FILE
    if existing.is_file():
        if target.resolve() != existing.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(existing, target)
        return target
    cfg = load_config(checkpoint / ckpt.CONFIG_FILE)
    model = Transformer(cfg.model.build())
    ckpt.read_weights(checkpoint, model)  # every shard, into this one process's model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    save_model(model, str(tmp))
    tmp.replace(target)
    if out is None:  # the checkpoint now lists (and verifies) its consolidated weights
        step = json.loads((checkpoint / ckpt.MANIFEST_FILE).read_text())["step"]
        write_text_atomically(
            checkpoint / ckpt.MANIFEST_FILE,
            json.dumps(build_manifest(checkpoint, step), indent=1) + "\n",
        )
    return target


def run(args: argparse.Namespace) -> int:
    checkpoint = find_checkpoint(args.path, args.step)
    print(consolidate(checkpoint, args.out))
    return 0
