"""Atomic checkpoints, keep-last-K, tied weights, RNG state, the manifest, and state.pt that
cannot run code (crashes, leftovers and full disks: test_checkpoint_crashes.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil

import pytest
import torch
from checkpoint_helpers import Tied, _save

from mxfp8 import checkpoint as ckpt
from mxfp8.checkpoint import write as ckpt_write  # what the writer looks its helpers up in


def test_round_trip_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    a, b = Tied(), Tied()
    path = ckpt.save_checkpoint(
        tmp_path, 7, model=a, state={"step": 7, "x": torch.arange(3)}, config_toml="", keep_last=2
    )
    assert path.name == "step_0000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.toml",
        "manifest.json",
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

    monkeypatch.setattr(ckpt_write.torch, "save", boom)
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


# --- manifest and verification -------------------------------------------------------------


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    path = _save(tmp_path, 7, v=1)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "mxfp8-checkpoint" and manifest["version"] == 1
    assert manifest["step"] == 7
    assert sorted(manifest["files"]) == ["config.toml", "model.safetensors", "state.pt"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) == manifest


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "config.toml"])
def test_truncated_file_is_named_and_not_loaded(tmp_path, name):
    path = _save(tmp_path, 1, v=1)
    f = path / name
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(ckpt.CheckpointError, match=rf"{name}: size mismatch"):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match=rf"{name}: size mismatch"):
        ckpt.load_checkpoint(path, Tied())


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_corrupted_file_same_size_fails_the_checksum(tmp_path, name):
    path = _save(tmp_path, 1, v=1)
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=rf"{name}: checksum mismatch"):
        ckpt.load_checkpoint(path, Tied())


def test_missing_file_and_missing_or_unreadable_manifest(tmp_path):
    path = _save(tmp_path, 1, v=1)
    (path / "state.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: missing file"):
        ckpt.verify_checkpoint(path)
    path = _save(tmp_path, 2, v=1)
    (path / "manifest.json").write_text('{"format": "mxfp8-checkpoint", "ver')
    with pytest.raises(ckpt.CheckpointError, match=r"manifest\.json: unreadable manifest"):
        ckpt.verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"manifest\.json: missing manifest"):
        ckpt.load_checkpoint(path, Tied())


def test_manifest_of_another_step_is_refused(tmp_path):
    a, b = _save(tmp_path, 1, v=1), _save(tmp_path, 2, v=2)
    shutil.copy(a / "manifest.json", b / "manifest.json")
    with pytest.raises(ckpt.CheckpointError, match="manifest of step 1 in the directory of step 2"):
        ckpt.verify_checkpoint(b)


def test_list_checkpoints_only_lists_complete_ones(tmp_path):
    _save(tmp_path, 1, v=1)
    (_save(tmp_path, 2, v=2) / "manifest.json").unlink()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000001"


def test_latest_intact_checkpoint_skips_damaged_newer_ones(tmp_path, caplog):
    assert ckpt.latest_intact_checkpoint(tmp_path) == (None, [])
    for step in (1, 2, 3):
        _save(tmp_path, step, v=step)
    root = tmp_path / "checkpoints"
    (root / "step_0000002" / "manifest.json").unlink()
    state = root / "step_0000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:10])
    with caplog.at_level(logging.INFO, logger="mxfp8.checkpoint"):
        latest, skipped = ckpt.latest_intact_checkpoint(tmp_path)
    assert latest == root / "step_0000001"
    assert [p.name for p, _ in skipped] == ["step_0000003", "step_0000002"]
    assert "state.pt: size mismatch" in skipped[0][1]
    assert "missing manifest" in skipped[1][1]
    assert "skipping checkpoint" in caplog.text and "step_0000003" in caplog.text
    assert ckpt.load_checkpoint(latest, Tied())["v"] == 1
    # nothing verifies: None, and every checkpoint is reported
    (latest / "config.toml").write_text("changed")
    latest, skipped = ckpt.latest_intact_checkpoint(tmp_path)
    assert latest is None and len(skipped) == 3


# --- nothing in a checkpoint can run code ------------------------------------------------------


class _Payload:
    """Unpickling this calls ``make(marker)`` (os.mkdir or open: both create ``marker``): proof
    that code from the file ran."""

    def __init__(self, make, marker):
        self.make, self.marker = make, str(marker)

    def __reduce__(self):
        return (self.make, (self.marker, "w") if self.make is open else (self.marker,))


@pytest.mark.parametrize("make, named", [(os.mkdir, "posix.mkdir"), (open, "io.open")])
def test_malicious_state_pt_is_refused_without_running_it(tmp_path, make, named):
    path = _save(tmp_path, 4, v=1)
    proof = tmp_path / "payload-works"
    torch.save({"x": _Payload(make, proof)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # the payload does run when allowed
    assert proof.exists()

    marker = tmp_path / "pwned"
    torch.save({"step": 4, "x": _Payload(make, marker)}, path / "state.pt")
    ckpt.write_manifest(path, 4)  # a matching manifest: the checksum does not catch it
    ckpt.verify_checkpoint(path)
    assert ckpt.latest_intact_checkpoint(tmp_path)[0] == path
    model = Tied()
    before = model.emb.weight.detach().clone()
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: refused") as info:
        ckpt.load_checkpoint(path, model)
    assert not marker.exists()
    assert f"GLOBAL {named}" in str(info.value)  # what it tried to call
    assert "do not load this file with weights_only=False" in str(info.value)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert torch.equal(model.emb.weight, before)  # the model was not touched either


def test_garbage_state_pt_is_a_checkpoint_error(tmp_path):
    path = _save(tmp_path, 4, v=1)
    (path / "state.pt").write_bytes(b"not a zip file at all" * 10)
    ckpt.write_manifest(path, 4)
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: "):
        ckpt.load_checkpoint(path, Tied())
