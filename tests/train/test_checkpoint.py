"""Atomic checkpoints, keep-last-K, tied weights and RNG state."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from mxfp8.train import checkpoint as ckpt


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_round_trip_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    a, b = Tied(), Tied()
    path = ckpt.save_checkpoint(
        tmp_path, 7, model=a, state={"step": 7, "x": torch.arange(3)}, config_toml="", keep_last=2
    )
    assert path.name == "step_0000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.toml",
        "model.safetensors",
        "state.pt",
    ]
    state = ckpt.load_checkpoint(path, b)
    assert state["step"] == 7 and torch.equal(state["x"], torch.arange(3))
    assert torch.equal(a.emb.weight, b.emb.weight)
    assert b.head.weight is b.emb.weight  # still tied after loading


def test_keep_last_k(tmp_path):
    m = Tied()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model=m, state={}, config_toml="", keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000004"


def test_failed_write_leaves_previous_checkpoints(tmp_path, monkeypatch):
    m = Tied()
    ckpt.save_checkpoint(tmp_path, 1, model=m, state={}, config_toml="", keep_last=1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model=m, state={}, config_toml="", keep_last=1)
    # the half-written directory is not a checkpoint, and the old one was not pruned
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]
    assert not (tmp_path / "checkpoints" / "step_0000002").exists()


def test_resaving_a_step_replaces_it(tmp_path):
    m = Tied()
    ckpt.save_checkpoint(tmp_path, 3, model=m, state={"v": 1}, config_toml="", keep_last=2)
    ckpt.save_checkpoint(tmp_path, 3, model=m, state={"v": 2}, config_toml="", keep_last=2)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), Tied())["v"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000003"]


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "s.pt")
    expect = (torch.rand(4), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (torch.rand(4), random.random())
    assert torch.equal(expect[0], got[0]) and expect[1] == got[1]
