"""Language-model evaluation: validation loss, perplexity and bits per byte over a token split.

The split is cut into consecutive, non-overlapping windows of ``seq_len + 1`` tokens (each
window predicts its last ``seq_len`` tokens from the ones before, as training does), in order
from the start, so every token of the evaluated range is predicted exactly once and the result
does not depend on a seed. The forward is the training loop's validation forward
(:func:`mxfp8.model.transformer.inference_forward`: the recipe's autocast, the run's quantized
layers), so ``mxfp8 eval`` of a run's checkpoint on its validation split agrees with its
validation loss up to the choice of windows, and on the run's own validation batches
(:func:`evaluate_val_batches`) equals it bit for bit.

- ``loss``: mean next-token cross-entropy in nats over the predicted tokens;
- ``perplexity``: ``exp(loss)``;
- ``bits_per_byte``: the summed loss in bits divided by the UTF-8 bytes of the predicted
  tokens, decoded as one text (a character whose bytes span two windows counts once; special
  tokens decode to nothing and count no bytes); comparable across tokenizers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from mxfp8.errors import UserError
from mxfp8.layers.recipe import Recipe
from mxfp8.model.transformer import Transformer, eval_mode, inference_forward

__all__ = ["append_evaluation", "eval_mode", "evaluate_lm", "evaluate_val_batches"]


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
    nll, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        rows = np.stack([tokens[s : s + seq_len + 1] for s in starts[b : b + batch_size]])
        batch = torch.from_numpy(rows.astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits, _ = inference_forward(model, x, recipe=recipe)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        nll += float(losses)
        count += y.numel()
    # the predicted tokens are one contiguous range of the split: decode it whole
    predicted = tokens[1 : 1 + count].tolist()
    n_bytes = len(tokenizer.decode(predicted).encode("utf-8"))
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


def evaluate_val_batches(loaded: Any) -> dict[str, Any]:
    """The loss of a run's checkpoint on the run's own validation batches (``run.eval_batches``
    batches of ``run.batch_size`` windows, :func:`mxfp8.data.batches.eval_batches`), by the
    training loop's own :func:`~mxfp8.train.loop.evaluate`: the ``val_loss`` the run logged at
    that step, bit for bit (unless an adaptive switch happened at that very step: the run
    validated before it)."""
    from mxfp8.data.batches import eval_batches
    from mxfp8.data.prepare import prepare_data
    from mxfp8.train.loop import evaluate

    cfg = loaded.run_config
    if cfg is None:
        raise UserError(f"{loaded.source}: --val-batches needs the run the model came from")
    run = cfg.run
    batches = eval_batches(prepare_data(cfg.data), batch_size=run.batch_size,
                           seq_len=run.seq_len, n_batches=run.eval_batches)  # fmt: skip
    device = loaded.model.tok_embeddings.weight.device
    loss = evaluate(loaded.model, batches, device, recipe=loaded.run_recipe)
    return {"loss": loss, "perplexity": math.exp(loss), "val_batches": run.eval_batches,
            "tokens": run.eval_batches * run.batch_size * run.seq_len}  # fmt: skip


def append_evaluation(path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the ``evaluations`` list of the JSON file ``path`` (atomically)."""
    import json
    from pathlib import Path

    from mxfp8.fileio import write_text_atomically

    path = Path(path)
    previous = json.loads(path.read_text()) if path.is_file() else {"evaluations": []}
    previous.setdefault("evaluations", []).append(entry)
    write_text_atomically(path, json.dumps(previous, indent=1) + "\n")
