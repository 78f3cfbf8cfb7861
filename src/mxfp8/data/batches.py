"""Batches from prepared token files (:mod:`mxfp8.data.prepare`).

Training batches are random windows drawn by a generator seeded from ``(seed, step, micro,
split)`` alone: the data position of any step is recomputed from the step number, so resuming
a run needs no data state. Validation batches are a fixed set of windows spread evenly over
the held-out split.
"""

from __future__ import annotations

import numpy as np
import torch

from mxfp8.data.prepare import SPLITS, PreparedData
from mxfp8.data.sources import DataError


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    # [B] starts -> [B, seq_len + 1] windows; y is x shifted left by one token
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _split_tokens(data: PreparedData, split: str, seq_len: int) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    tokens = data.train if split == "train" else data.val
    if len(tokens) < seq_len + 1:
        source = data.meta.get("config", {}).get("source", str(data.path))
        raise DataError(
            f"the {split} split of {source!r} has {len(tokens)} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1} (one window of a batch); give more text or a "
            "smaller --run.seq_len"
        )
    return tokens


def require_tokens(data: PreparedData, seq_len: int) -> None:
    """Raise :class:`DataError` unless both splits hold one window of ``seq_len + 1`` tokens.

    Meant right after :func:`prepare_data`, before a run writes anything: ``get_batch`` and
    ``eval_batches`` would raise the same error, but only once the run has started.
    """
    for split in SPLITS:
        _split_tokens(data, split, seq_len)


def get_batch(
    data: PreparedData,
    split: str,
    *,
    seed: int,
    step: int,
    micro: int,
    batch_size: int,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), LongTensors [batch_size, seq_len], random windows with y[:, t] = x[:, t + 1].

    A pure function of (seed, step, micro, split): micro-batch ``micro`` of step ``step``
    is the same whatever ran before, which is what makes resume exact.
    """
    for name, v in (("seed", seed), ("step", step), ("micro", micro)):
        if not isinstance(v, int | np.integer) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    tokens = _split_tokens(data, split, seq_len)
    rng = np.random.default_rng([int(seed), int(step), int(micro), SPLITS.index(split)])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return _windows(tokens, starts, seq_len)


def eval_batches(
    data: PreparedData, *, batch_size: int, seq_len: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of ``n_batches`` validation batches: windows spread evenly over val."""
    if batch_size < 1 or seq_len < 1 or n_batches < 1:
        raise ValueError("batch_size, seq_len and n_batches must be >= 1")
    tokens = _split_tokens(data, "val", seq_len)
    starts = np.linspace(0, len(tokens) - seq_len - 1, batch_size * n_batches).round()
    starts = starts.astype(np.int64).reshape(n_batches, batch_size)
    return [_windows(tokens, s, seq_len) for s in starts]
