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
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from mxfp8.fileio import fsync_dir, fsync_file
from mxfp8.train.manifest import (  # re-exported: the checkpoint API in one place
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


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    state: dict[str, Any],
    config_toml: str,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``.

    ``model`` weights go to safetensors (shared tensors, e.g. tied embeddings, are stored
    once); ``state`` (optimizer, scheduler, scaler, RNG, data position...) to ``state.pt``;
    then ``manifest.json``. On failure (disk full, directory not writable...) the temporary
    directory is removed, the previous checkpoints are left as they were (none is pruned) and
    a :class:`CheckpointWriteError` says which checkpoint, where, and why. The checkpoint just
    written is never pruned, even when newer steps exist (a re-save after a resume).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    old = root / f".old-{name}-{os.getpid()}"
    recover(run_dir)
    doing = f"creating {tmp}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        writers: list[tuple[str, Callable[[Path], object]]] = [
            (WEIGHTS_FILE, lambda p: save_model(model, str(p))),
            (STATE_FILE, lambda p: torch.save(state, p)),
            (CONFIG_FILE, lambda p: p.write_text(config_toml, encoding="utf-8")),
        ]
        for fname, write in writers:
            doing = f"writing {fname}"
            write(tmp / fname)
            fsync_file(tmp / fname)
        doing = f"writing {MANIFEST_FILE}"
        write_manifest(tmp, step)
        fsync_dir(tmp)
        doing = f"renaming {tmp.name} to {name}"
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            os.replace(final, old)  # a kill from here to the next rename: recover() undoes it
            os.replace(tmp, final)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            try:
                os.replace(old, final)
            except OSError:
                pass  # left for recover()
        err = CheckpointWriteError(
            f"could not write checkpoint {name} to {root} (while {doing}): {_reason(e, root)}; "
            "the previous checkpoints were left as they were"
        )
        err.errno = e.errno if isinstance(e, OSError) else None
        raise err from e
    shutil.rmtree(old, ignore_errors=True)
    _prune(root, final, keep_last)
    return final


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


# --- loading ---------------------------------------------------------------------------------


def _unpickling_reason(e: Exception) -> str:
    """The sentence of torch's weights-only refusal that says what it met (``Unsupported
    global: GLOBAL io.open ...``, ``Trying to load unsupported GLOBAL posix.system ...``). The
    rest of it suggests loading with ``weights_only=False``, exactly what must not be done."""
    text = str(e)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    paragraphs = [p.strip() for p in (rest if marker else text).split("\n\n") if p.strip()]
    detail = next(
        (
            p
            for p in paragraphs
            if not p.startswith(("Weights only load failed", "Check the documentation"))
        ),
        "",
    )
    detail = " ".join(detail.split(". ")[0].removesuffix(".").split())
    return (detail[:197] + "...") if len(detail) > 200 else (detail or type(e).__name__)


def load_checkpoint(path: str | Path, model: nn.Module, *, verify: bool = True) -> dict[str, Any]:
    """Load weights into ``model`` (strict) and return the ``state.pt`` dict.

    The checkpoint is first checked against its manifest (``verify=False`` skips that, e.g.
    right after :func:`latest_intact_checkpoint` verified it). ``state.pt`` is loaded before
    the weights, so ``model`` is left untouched when it is refused. A corrupted or unsafe file
    raises :class:`CheckpointError` naming it; weights that do not fit ``model`` (another
    config) raise safetensors' ``RuntimeError``.
    """
    path = Path(path)
    state = load_state(path, verify=verify)
    weights = path / WEIGHTS_FILE
    try:
        load_model(model, str(weights), strict=True)  # strict: raises on any key mismatch
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable ({e})") from e
    return state


def load_state(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The ``state.pt`` dict of a checkpoint (verified first unless ``verify=False``), read
    with ``weights_only=True``: plain containers and tensors only, never code."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    state_path = path / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{state_path}: refused: it holds more than tensors and plain containers "
            f"({_unpickling_reason(e)}); nothing in it was run. A state.pt written by mxfp8 "
            "never does: do not load this file with weights_only=False"
        ) from e
    except Exception as e:  # a broken (or hostile) pickle fails in many ways: all bad input
        raise CheckpointError(f"{state_path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path}: holds a {type(state).__name__}, not a state dict")
    return state


# --- RNG state -----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch CPU/CUDA and Python RNG states (numpy is not used by training)."""
    import random

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
