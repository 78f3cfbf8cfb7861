"""Batches: training batches as a pure function of (seed, step, micro), windows shifted by one
token, fixed validation batches from the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mxfp8.data.batches import eval_batches, get_batch


def find_window(tokens: np.ndarray, row: np.ndarray) -> int:
    """Start of ``row`` inside ``tokens`` (-1 if absent)."""
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens), len(row))
    hits = np.flatnonzero((windows == row).all(axis=1))
    return int(hits[0]) if len(hits) else -1


def test_get_batch_is_a_pure_function_of_seed_step_micro(shakespeare):
    kw = dict(batch_size=4, seq_len=64)
    a = get_batch(shakespeare, "train", seed=1, step=10, micro=2, **kw)
    torch.manual_seed(123)  # global RNGs play no part
    np.random.seed(123)
    get_batch(shakespeare, "train", seed=1, step=11, micro=0, **kw)
    b = get_batch(shakespeare, "train", seed=1, step=10, micro=2, **kw)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    for other in (dict(seed=2, step=10, micro=2), dict(seed=1, step=9, micro=2)):
        assert not torch.equal(get_batch(shakespeare, "train", **other, **kw)[0], a[0])
    assert not torch.equal(get_batch(shakespeare, "train", seed=1, step=10, micro=3, **kw)[0], a[0])
    assert not torch.equal(get_batch(shakespeare, "val", seed=1, step=10, micro=2, **kw)[0], a[0])


def test_get_batch_windows_are_shifted_slices(shakespeare):
    x, y = get_batch(shakespeare, "val", seed=0, step=0, micro=0, batch_size=3, seq_len=32)
    assert x.shape == y.shape == (3, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert find_window(shakespeare.val, row) >= 0
    with pytest.raises(ValueError, match="split"):
        get_batch(shakespeare, "test", seed=0, step=0, micro=0, batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="step"):
        get_batch(shakespeare, "train", seed=0, step=-1, micro=0, batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        get_batch(shakespeare, "val", seed=0, step=0, micro=0, batch_size=1, seq_len=10**7)


def test_eval_batches_are_fixed_and_from_val(shakespeare):
    batches = eval_batches(shakespeare, batch_size=2, seq_len=16, n_batches=3)
    again = eval_batches(shakespeare, batch_size=2, seq_len=16, n_batches=3)
    assert len(batches) == 3
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        assert x.shape == (2, 16) and torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert find_window(shakespeare.val, row) >= 0
    starts = [find_window(shakespeare.val, x[i].numpy()) for x, _ in batches for i in range(2)]
    assert starts == sorted(starts) and starts[-1] > len(shakespeare.val) // 2  # spread out
