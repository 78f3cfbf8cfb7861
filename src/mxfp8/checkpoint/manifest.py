"""The manifest of a checkpoint: what each of its files must be, and the check against it.

``manifest.json`` (written last into a checkpoint, once the other files are on disk)::

    {"format": "mxfp8-checkpoint", "version": 1, "step": N,
     "files": {"model.safetensors": {"size": BYTES, "sha256": HEX}, "state.pt": ..., ...}}

:func:`verify_checkpoint` compares every size first (cheap: catches truncation), then every
SHA-256 (streamed), and raises :class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "mxfp8-checkpoint"
MANIFEST_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.toml"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")  # as named by checkpoint.step_dir_name
DCP_METADATA = ".metadata"  # a distributed checkpoint's DCP index (mxfp8.parallel.dcp)
CHECKPOINT_FILES = (STATE_FILE, CONFIG_FILE)  # each must be in the manifest, and one of:
WEIGHT_FILES = (WEIGHTS_FILE, DCP_METADATA)  # the weights, or DCP shards (with their index)


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupted, unsafe to load, or could not be written. The
    message names the file (or directory) and what is wrong with it."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, directory not writable...). Also an
    ``OSError``, whose ``errno`` is the cause's when it had one (``errno.ENOSPC``...)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()  # streamed, in chunks


def build_manifest(path: str | Path, step: int) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path`` as it is on disk::

        {"format": "mxfp8-checkpoint", "version": 1, "step": 7,
         "files": {"model.safetensors": {"size": 1234, "sha256": "<64 hex digits>"}, ...}}

    listing every file of the directory (sizes in bytes): :data:`CHECKPOINT_FILES` plus
    ``model.safetensors`` and/or the DCP shards of a distributed run (``.metadata``,
    ``__R_0.distcp``).
    """
    path = Path(path)
    files = {}
    for f in sorted(path.iterdir()):
        if f.name != MANIFEST_FILE and f.is_file():
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "files": files}


def write_manifest(path: str | Path, step: int) -> Path:
    """Hash the files of checkpoint directory ``path`` into its ``manifest.json`` (flushed to
    disk). Done last by :func:`save_checkpoint`: a manifest vouches for files already written."""
    out = Path(path) / MANIFEST_FILE
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(build_manifest(path, step), fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return out


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not mpath.is_file():
        raise CheckpointError(
            f"{mpath}: missing manifest: not a complete checkpoint (interrupted before it was "
            "finished, or written by an mxfp8 version without manifests)"
        )
    try:
        manifest = json.loads(mpath.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        manifest = {}
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{mpath}: unreadable manifest (not an mxfp8 checkpoint manifest)")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(
            f"{mpath}: unreadable manifest: version {manifest.get('version')!r}, this mxfp8 "
            f"reads version {MANIFEST_VERSION}"
        )
    for name in CHECKPOINT_FILES:
        if name not in files:
            raise CheckpointError(f"{mpath}: unreadable manifest: {name} is not listed")
    if not any(name in files for name in WEIGHT_FILES):
        raise CheckpointError(f"{mpath}: unreadable manifest: neither {WEIGHTS_FILE} nor "
                              f"DCP shards ({DCP_METADATA}) are listed")  # fmt: skip
    for name, entry in files.items():
        ok_entry = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        )
        if not ok_entry or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{mpath}: unreadable manifest: bad entry {name!r}: {entry!r}")
    return manifest


def _verify(path: Path, expected_step: int | None) -> dict[str, Any]:
    manifest = _read_manifest(path)
    step = manifest.get("step")
    if expected_step is not None and step != expected_step:
        raise CheckpointError(
            f"{path / MANIFEST_FILE}: manifest of step {step!r} in the directory of step "
            f"{expected_step}"
        )
    # sizes first: a truncated file (the usual damage) is caught without hashing anything
    for name, entry in manifest["files"].items():
        f = path / name
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing file (listed in the manifest)") from None
        if size != entry["size"]:
            raise CheckpointError(
                f"{f}: size mismatch: {size} bytes on disk, {entry['size']} in the manifest "
                "(truncated or overwritten)"
            )
    for name, entry in manifest["files"].items():
        f = path / name
        try:
            digest = _sha256(f)
        except OSError as e:
            raise CheckpointError(f"{f}: unreadable ({e})") from e
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{f}: checksum mismatch: sha256 {digest[:16]}... on disk, "
                f"{entry['sha256'][:16]}... in the manifest (corrupted)"
            )
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check checkpoint directory ``path`` against its manifest and return the manifest.

    Raises :class:`CheckpointError` naming the file and the problem: missing or unreadable
    manifest, missing file, size mismatch, checksum mismatch, or a manifest of another step
    (for a ``step_N`` directory). Reads every file once (SHA-256 runs at about 1 GB/s).
    """
    path = Path(path)
    m = _STEP_DIR.match(path.name)
    return _verify(path, int(m.group(1)) if m else None)
