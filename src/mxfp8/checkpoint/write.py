"""Checkpoints: ``checkpoints/step_NNNNNNN/{model.safetensors, state.pt, config.toml,
manifest.json}``.

A checkpoint is written into a temporary directory next to its final place, flushed to disk,
then renamed in one ``os.replace``: a job killed mid-write leaves either the previous set of
checkpoints or the new one, never a half-written directory that ``--resume`` would pick up.

``manifest.json`` is written last, once the other files are on disk, and records their sizes
and SHA-256 (format in :func:`build_manifest`). A directory without one is not a checkpoint;
one whose files do not match it (truncated by a full disk, corrupted by a copy, edited) fails
:func:`verify_checkpoint` with a :class:`CheckpointError` naming the file and the problem, so
``--resume`` falls back to the newest checkpoint that verifies
(:func:`latest_intact_checkpoint`) instead of loading garbage.

Nothing read from a checkpoint can run code: weights are safetensors, and ``state.pt`` is
loaded with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers
and refuses anything else (a :class:`CheckpointError` too). The manifest is no defence against
a malicious file (whoever can write one can write the other), ``weights_only`` is.

Leftovers of a crash are ``.tmp-step_N-PID`` (a checkpoint being written), ``.old-step_N-PID``
(a checkpoint being replaced by a re-save of its step) and ``.del-step_N-PID`` (one being
pruned). :func:`list_checkpoints` ignores them; :func:`recover`, run before every save and by
:func:`latest_intact_checkpoint`, deletes them, except that when ``step_N`` itself is missing
(killed between the two renames of a re-save) an intact leftover of it is renamed back first:
re-saving a step never loses it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import nn

from mxfp8.checkpoint.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointWriteError,
    _verify,
    verify_checkpoint,
    write_manifest,
)
from mxfp8.checkpoint.read import is_sharded
from mxfp8.fileio import fsync_dir, fsync_file
from mxfp8.parallel.comm import LOCAL, Comm

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"

_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_LEFTOVER = re.compile(r"^\.(tmp|old|del)-(step_\d{7,})-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _step_dirs(run_dir: str | Path) -> list[Path]:
    """Every ``step_N`` directory of a run, oldest first, complete or not."""
    root = Path(run_dir) / CHECKPOINT_DIR
    try:
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [p for _, p in sorted(found) if p.is_dir()]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with a manifest), oldest first; temporary
    directories are ignored. Cheap: nothing is hashed (see :func:`latest_intact_checkpoint`)."""
    return [p for p in _step_dirs(run_dir) if (p / MANIFEST_FILE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, unverified; use :func:`latest_intact_checkpoint` to
    pick one to resume from."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest checkpoint that verifies or None, [(newer checkpoint skipped, why)...])``.

    Leftovers of a crash are dealt with first (:func:`recover`). Skipped checkpoints are also
    logged (info: the caller tells the user); they stay on disk for a human to look at
    (keep-last pruning removes them in time). Costs one hash of the checkpoint returned,
    plus one per skipped one.
    """
    recover(run_dir)
    skipped: list[tuple[Path, str]] = []
    for path in reversed(_step_dirs(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.info("skipping checkpoint %s: %s", path.name, e)  # the caller reports it
            skipped.append((path, str(e)))
            continue
        return path, skipped
    return None, skipped


# --- writing ---------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (not this one) may still be running. A leftover of a live
    process may be a checkpoint it is writing right now: it is left alone."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OSError, OverflowError):
        return False
    return True


def recover(run_dir: str | Path) -> list[str]:
    """Clean up the leftovers of crashed saves in ``run_dir``'s checkpoints; return what was
    done (also logged).

    For each step with leftovers: when ``step_N`` is missing, the first of its leftovers that
    verifies is renamed to ``step_N``: the ``.old-`` directory (the checkpoint that was being
    replaced by a re-save), else a ``.tmp-`` one (complete, killed just before its rename).
    Every other leftover is deleted. Leftovers named after a live process other than this
    one are left alone. Never raises for file-system errors (a read-only directory): what
    cannot be cleaned is only logged, and stays ignored by :func:`list_checkpoints`.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    by_step: dict[str, list[tuple[str, Path]]] = {}
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if m and not _pid_alive(int(m.group(3))):
            by_step.setdefault(m.group(2), []).append((m.group(1), p))
    done: list[str] = []
    for name, leftovers in sorted(by_step.items()):
        final = root / name
        step = int(name.removeprefix("step_"))
        if not final.exists():
            candidates = [p for kind in ("old", "tmp") for k, p in leftovers if k == kind]
            for p in candidates:
                try:
                    _verify(p, step)
                    os.replace(p, final)
                except (CheckpointError, OSError) as e:
                    # an unfinished write (no manifest yet) is the normal trace of a crash
                    # mid-save, not news: the previous checkpoints are intact
                    log.info("checkpoint leftover %s not restored: %s", p, e)
                    continue
                done.append(f"restored {final} from {p.name}")
                log.warning("restored checkpoint %s from %s (left by a crash)", final, p.name)
                break
        for _, p in leftovers:
            if not p.exists():
                continue
            shutil.rmtree(p, ignore_errors=True)
            if p.exists():
                log.warning("could not delete checkpoint leftover %s", p)
            else:
                done.append(f"deleted {p}")
                log.info("deleted checkpoint leftover %s", p)
    if done:
        fsync_dir(root)
    return done


def _reason(e: BaseException, root: Path) -> str:
    """Why a write failed, in words: the OS's for an OSError, else the exception's text
    (torch and safetensors turn a full disk into RuntimeError/SafetensorError), then the free
    space on that disk when it may be the cause."""
    if isinstance(e, OSError) and e.strerror:
        why = e.strerror[:1].lower() + e.strerror[1:]
    else:
        why = f"{type(e).__name__}: {e}"
    if not (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
        try:
            free = shutil.disk_usage(root if root.exists() else root.parent).free
            why += f" ({free / 2**20:,.0f} MiB free on that disk)"
        except OSError:
            pass
    return why


def _write_error(name: str, root: Path, doing: str, why: str, err_no: int | None):
    err = CheckpointWriteError(
        f"could not write checkpoint {name} to {root} (while {doing}): {why}; "
        "the previous checkpoints were left as they were"
    )
    err.errno = err_no
    return err


def _failure(doing: str, e: BaseException, root: Path) -> tuple[str, str, int | None]:
    return doing, _reason(e, root), e.errno if isinstance(e, OSError) else None


def _unique_names(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with each tied matrix under one name only, the one ``save_model`` keeps
    (the alphabetically first of its names), so the file equals a single-process one."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    drop = {n for names in groups.values() for n in sorted(names)[1:]}
    return {k: v.contiguous() for k, v in weights.items() if k not in drop}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    state: dict[str, Any],
    config_toml: str,
    keep_last: int,
    optimizer: torch.optim.Optimizer | None = None,
    comm: Comm = LOCAL,
    consolidate: bool = False,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``.

    ``model`` weights go to safetensors (shared tensors, e.g. tied embeddings, are stored
    once); ``state`` (optimizer, scheduler, scaler, RNG, data position...) to ``state.pt``;
    then ``manifest.json``. On failure (disk full, directory not writable...) the temporary
    directory is removed, the previous checkpoints are left as they were (none is pruned) and
    a :class:`CheckpointWriteError` says which checkpoint, where, and why. The checkpoint just
    written is never pruned, even when newer steps exist (a re-save after a resume).

    Distributed runs pass ``optimizer`` and ``comm``, and every rank calls this: the model
    and optimizer state go to DCP shards that every rank writes into rank 0's temporary
    directory (a file system all ranks share), rank 0 writes the other files, the manifest
    (of every file, shards included) and does the renames. ``consolidate`` also gathers the
    full weights into ``model.safetensors`` (the final checkpoint of a run). Every rank
    returns the same path or raises the same error.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    name = step_dir_name(step)
    final = root / name
    pid = comm.broadcast(os.getpid())  # rank 0's: what recover() reads in leftover names
    tmp = root / f".tmp-{name}-{pid}"
    old = root / f".old-{name}-{pid}"
    failed = None
    if comm.is_main:  # a fresh temporary directory
        try:
            recover(run_dir)
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except Exception as e:
            failed = _failure(f"creating {tmp}", e, root)
    failed = comm.broadcast(failed)
    if failed is None and optimizer is not None:  # every rank: its shards, the full weights
        from mxfp8.parallel.dcp import full_model_state, save_sharded

        weights = None
        try:
            save_sharded(tmp, model, optimizer)
            if consolidate:
                weights = full_model_state(model)  # {} on ranks other than 0
        except Exception as e:
            failed = _failure("writing the sharded model and optimizer state", e, root)
        failed = comm.first(failed)
    if failed is None and comm.is_main:
        failed = _finish(tmp, final, old, step, model, state, config_toml,
                         weights if optimizer is not None else None)  # fmt: skip
    failed = comm.broadcast(failed)
    if failed is not None:
        if comm.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not final.exists():
                try:
                    os.replace(old, final)
                except OSError:
                    pass  # left for recover()
        raise _write_error(name, root, *failed)
    if comm.is_main:
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, final, keep_last)
    comm.barrier()  # nobody goes on (or exits) before the checkpoint is in place
    return final


def _finish(tmp: Path, final: Path, old: Path, step: int, model: nn.Module,
            state: dict[str, Any], config_toml: str,
            weights: dict[str, torch.Tensor] | None) -> tuple | None:  # fmt: skip
    """Rank 0's part: the files besides the shards, the manifest, the renames. Returns None,
    or what failed (for :func:`_write_error`)."""
    root = final.parent
    writers: list[tuple[str, Callable[[Path], object]]] = [
        (STATE_FILE, lambda p: torch.save(state, p)),
        (CONFIG_FILE, lambda p: p.write_text(config_toml, encoding="utf-8")),
    ]
    if weights is None and not is_sharded(tmp):
        writers.insert(0, (WEIGHTS_FILE, lambda p: save_model(model, str(p))))
    elif weights:  # consolidated weights of a distributed run
        writers.insert(0, (WEIGHTS_FILE,
                           lambda p: save_file(_unique_names(model, weights), str(p))))  # fmt: skip
    doing = ""
    try:
        for fname, write in writers:
            doing = f"writing {fname}"
            write(tmp / fname)
            fsync_file(tmp / fname)
        doing = f"writing {MANIFEST_FILE}"
        write_manifest(tmp, step)
        fsync_dir(tmp)
        doing = f"renaming {tmp.name} to {final.name}"
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            os.replace(final, old)  # a kill from here to the next rename: recover() undoes it
            os.replace(tmp, final)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except Exception as e:
        return _failure(doing, e, root)
    return None


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, never ``keep``. Each is
    renamed to a ``.del-`` leftover before its files go, so a kill mid-delete never leaves a
    partial ``step_N`` directory."""
    if keep_last <= 0:
        return
    others = [p for p in list_checkpoints(root.parent) if p != keep]
    for stale in others[: max(0, len(others) - (keep_last - 1))]:
        doomed = root / f".del-{stale.name}-{os.getpid()}"
        try:
            os.replace(stale, doomed)
        except OSError as e:
            log.warning("could not prune checkpoint %s: %s", stale, e)
            continue
        shutil.rmtree(doomed, ignore_errors=True)
