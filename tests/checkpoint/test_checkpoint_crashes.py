"""Checkpoints and crashes: leftovers of a killed save are ignored, then cleaned or restored
(a re-saved step is never lost); a full disk or an unwritable directory keeps the previous
checkpoint and says what failed."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
from checkpoint_helpers import Tied, _leftovers, _save

from mxfp8 import checkpoint as ckpt
from mxfp8.checkpoint import write as ckpt_write  # what the writer looks its helpers up in

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
