"""Atomic checkpoints, keep-last-K, tied weights and RNG state."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from mxfp8 import checkpoint as ckpt
from mxfp8.checkpoint import write as ckpt_write  # what the writer looks its helpers up in


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


def _save(run_dir, step, keep_last=3, **state):
    toml = f"# step {step}\n"
    return ckpt.save_checkpoint(
        run_dir, step, model=Tied(), state=state, config_toml=toml, keep_last=keep_last
    )


def _leftovers(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


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


# --- leftovers of a crash --------------------------------------------------------------------

DEAD_PID = 2**31 - 1  # above any pid_max: never a live process


def test_crash_leftovers_are_ignored_then_cleaned(tmp_path):
    path = _save(tmp_path, 1, v=1)
    root = tmp_path / "checkpoints"
    shutil.copytree(path, root / f".old-step_0000001-{DEAD_PID}")  # superseded: step_1 exists
    (root / f".tmp-step_0000002-{DEAD_PID}").mkdir()  # a partial write
    (root / f".tmp-step_0000002-{DEAD_PID}" / "model.safetensors").write_bytes(b"\0" * 8)
    shutil.copytree(path, root / f".del-step_0000000-{DEAD_PID}")  # an interrupted prune
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]
    done = ckpt.recover(tmp_path)
    assert len(done) == 3 and all(d.startswith("deleted") for d in done)
    assert _leftovers(tmp_path) == []
    assert ckpt.load_checkpoint(ckpt.latest_intact_checkpoint(tmp_path)[0], Tied())["v"] == 1


def test_leftovers_of_a_live_process_are_left_alone(tmp_path):
    _save(tmp_path, 1, v=1)
    busy = tmp_path / "checkpoints" / f".tmp-step_0000002-{os.getppid()}"
    busy.mkdir()
    assert ckpt.recover(tmp_path) == []
    _save(tmp_path, 2, v=2)
    assert busy.is_dir()


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so save_checkpoint runs no clean-up for it."""


def _crash_at_replace(monkeypatch, n):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == n:
            raise _Killed
        return real(src, dst)

    monkeypatch.setattr(ckpt_write.os, "replace", replace)
    return calls


@pytest.mark.parametrize("n", [1, 2, 3])
def test_kill_during_a_resave_never_loses_the_step(tmp_path, monkeypatch, n):
    """Re-saving step 3 (with step 2 to prune): renames final->.old (1), .tmp->final (2),
    step_2->.del (3). Killed at each of them, the next resume finds an intact step 3."""
    _save(tmp_path, 2, keep_last=2, v=0)
    _save(tmp_path, 3, keep_last=2, v=1)
    _crash_at_replace(monkeypatch, n)
    with pytest.raises(_Killed):
        _save(tmp_path, 3, keep_last=1, v=2)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    if n == 2:  # the window: the old checkpoint moved away, the new one not yet in place
        assert not (root / "step_0000003").exists()
    latest, skipped = ckpt.latest_intact_checkpoint(tmp_path)
    assert latest == root / "step_0000003" and skipped == []
    assert ckpt.load_checkpoint(latest, Tied())["v"] == (1 if n < 3 else 2)
    assert _leftovers(tmp_path) == []


def test_kill_before_the_first_rename_keeps_the_complete_write(tmp_path, monkeypatch):
    _save(tmp_path, 1, v=1)
    _crash_at_replace(monkeypatch, 1)
    with pytest.raises(_Killed):
        _save(tmp_path, 2, v=2)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000001"  # the .tmp is not listed
    latest, _ = ckpt.latest_intact_checkpoint(tmp_path)  # ...but complete: promoted
    assert latest.name == "step_0000002" and ckpt.load_checkpoint(latest, Tied())["v"] == 2
    assert _leftovers(tmp_path) == []


def test_damaged_leftover_is_not_restored(tmp_path, monkeypatch):
    _save(tmp_path, 3, v=1)
    _crash_at_replace(monkeypatch, 2)
    with pytest.raises(_Killed):
        _save(tmp_path, 3, v=2)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    for p in root.iterdir():  # both the .old and the .tmp of step 3 are damaged
        (p / "state.pt").write_bytes(b"")
    assert ckpt.latest_intact_checkpoint(tmp_path) == (None, [])
    assert list(root.iterdir()) == []


def test_failed_rename_of_a_resave_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    _save(tmp_path, 3, v=1)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(src, dst)

    monkeypatch.setattr(ckpt_write.os, "replace", replace)
    with pytest.raises(ckpt.CheckpointWriteError, match="step_0000003"):
        _save(tmp_path, 3, v=2)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000003", Tied())["v"] == 1
    assert _leftovers(tmp_path) == []


# --- disk full, unwritable directory ---------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_disk_full(*args, **kwargs):  # what torch.save raises on a full disk
    raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")


@pytest.mark.parametrize(
    "target, fake, file, why",
    [
        ("save_model", _enospc, "model.safetensors", "no space left on device"),
        ("torch.save", _enospc, "state.pt", "no space left on device"),
        ("torch.save", _torch_disk_full, "state.pt", "RuntimeError: .*unexpected pos.*MiB free"),
        ("write_manifest", _enospc, "manifest.json", "no space left on device"),
    ],
)
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target, fake, file, why):
    prev = _save(tmp_path, 1, keep_last=1, v=1)
    owner, attr = (ckpt_write.torch, "save") if target == "torch.save" else (ckpt_write, target)
    monkeypatch.setattr(owner, attr, fake)
    root = tmp_path / "checkpoints"
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        _save(tmp_path, 2, keep_last=1, v=2)
    msg = str(info.value)
    assert f"could not write checkpoint step_0000002 to {root}" in msg
    assert f"while writing {file}" in msg and re.search(why, msg)
    assert isinstance(info.value, OSError) and isinstance(info.value, ckpt.CheckpointError)
    if fake is _enospc:
        assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []  # the temporary directory is gone
    assert ckpt.latest_intact_checkpoint(tmp_path) == (prev, [])  # intact, still the latest
    assert ckpt.load_checkpoint(prev, Tied())["v"] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_checkpoints_dir(tmp_path):
    prev = _save(tmp_path, 1, v=1)
    root = tmp_path / "checkpoints"
    root.chmod(0o555)
    try:
        with pytest.raises(ckpt.CheckpointWriteError, match="permission denied") as info:
            _save(tmp_path, 2, v=2)
    finally:
        root.chmod(0o755)
    assert f"could not write checkpoint step_0000002 to {root}" in str(info.value)
    assert ckpt.latest_intact_checkpoint(tmp_path) == (prev, [])


def test_unwritable_checkpoints_dir_simulated(tmp_path, monkeypatch):
    """The read-only case as root (who ignores permissions): mkdir of the temporary directory
    fails with EACCES."""
    prev = _save(tmp_path, 1, v=1)
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    root = tmp_path / "checkpoints"
    with pytest.raises(ckpt.CheckpointWriteError, match="permission denied") as info:
        _save(tmp_path, 2, v=2)
    assert f"could not write checkpoint step_0000002 to {root}" in str(info.value)
    assert info.value.errno == errno.EACCES
    monkeypatch.undo()
    assert ckpt.latest_intact_checkpoint(tmp_path) == (prev, [])
    assert _leftovers(tmp_path) == []


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """A resumed run re-saving step 2 while a (damaged) step 3 exists keeps step 2."""
    for step in (1, 2, 3):
        _save(tmp_path, step, v=step)
    _save(tmp_path, 2, keep_last=1, v=20)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002"]
    assert ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000002", Tied())["v"] == 20
