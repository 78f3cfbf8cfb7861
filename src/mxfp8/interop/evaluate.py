"""Language-model evaluation: validation loss, perplexity and bits per byte over a token split.

The split is cut into consecutive, non-overlapping windows of ``seq_len + 1`` tokens (each
window predicts its last ``seq_len`` tokens from the ones before, as training does), in order
from the start, so every token of the evaluated range is predicted exactly once and the result
does not depend on a seed. The forward runs under the recipe's autocast (bf16 unless the recipe
computes in fp16 or fp32), as the training loop's validation does, so ``mxfp8 eval`` of a run's
final checkpoint on its validation split agrees with its final validation loss up to the choice
of windows.

- ``loss``: mean next-token cross-entropy in nats over the predicted tokens;
- ``perplexity``: ``exp(loss)``;
- ``bits_per_byte``: the summed loss in bits divided by the UTF-8 bytes those tokens decode to
  (special tokens decode to nothing and count no bytes); comparable across tokenizers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from mxfp8.errors import UserError
from mxfp8.layers.recipe import Recipe
from mxfp8.layers.recipe import recipe as named_recipe
from mxfp8.train.model import Transformer


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then the mode it had (an inference forward of a model
    in training mode would still checkpoint its blocks)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _windows(n_tokens: int, seq_len: int, max_tokens: int | None) -> list[int]:
    usable = n_tokens - 1
    if max_tokens is not None:
        usable = min(usable, max_tokens)
    count = usable // seq_len
    if count == 0:
        raise UserError(f"the split has {n_tokens} tokens: fewer than one window of "
                        f"{seq_len} + 1 (lower --seq-len)")  # fmt: skip
    return [i * seq_len for i in range(count)]


@torch.no_grad()
def evaluate_lm(model: Transformer, tokens: np.ndarray, tokenizer: Tokenizer, *, seq_len: int,
                batch_size: int = 8, max_tokens: int | None = None,
                recipe: Recipe | None = None) -> dict[str, Any]:  # fmt: skip
    """Loss, perplexity and bits per byte of ``model`` on the 1-D id array ``tokens``."""
    if seq_len < 1 or seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq-len must be in [1, {model.cfg.max_seq_len}], got {seq_len}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    starts = _windows(len(tokens), seq_len, max_tokens)
    device = model.tok_embeddings.weight.device
    nll, count, n_bytes = 0.0, 0, 0
    with eval_mode(model):
        for b in range(0, len(starts), batch_size):
            rows = np.stack([tokens[s : s + seq_len + 1] for s in starts[b : b + batch_size]])
            batch = torch.from_numpy(rows.astype(np.int64)).to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            with (recipe or named_recipe("bf16")).autocast(device.type):
                logits, _ = model(x)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            nll += float(losses)
            count += y.numel()
            n_bytes += sum(len(tokenizer.decode(r.tolist()).encode("utf-8")) for r in y.cpu())
    loss = nll / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else None,
        "tokens": count,
        "bytes": n_bytes,
        "seq_len": seq_len,
        "windows": len(starts),
    }


def append_evaluation(path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the ``evaluations`` list of the JSON file ``path`` (atomically)."""
    import json
    from pathlib import Path

    from mxfp8.fileio import write_text_atomically

    path = Path(path)
    previous = json.loads(path.read_text()) if path.is_file() else {"evaluations": []}
    previous.setdefault("evaluations", []).append(entry)
    write_text_atomically(path, json.dumps(previous, indent=1) + "\n")
