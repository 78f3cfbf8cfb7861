"""Reading checkpoints: ``state.pt`` (never running code from it), the weights of either
layout, and the RNG state. :mod:`mxfp8.checkpoint` exports everything here.

Two layouts share one manifest (:mod:`mxfp8.checkpoint.manifest`): a single-process checkpoint
holds ``model.safetensors`` (the optimizer state is in ``state.pt``); a distributed one holds
the DCP shards of the model and optimizer (``.metadata`` plus ``__R_0.distcp`` files,
:mod:`mxfp8.parallel.dcp`), and at the end of a run also the consolidated
``model.safetensors``. Either loads at any world size.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model
from torch import nn

from mxfp8.checkpoint.manifest import (
    DCP_METADATA,
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    verify_checkpoint,
)


def is_sharded(path: str | Path) -> bool:
    """Whether checkpoint ``path`` holds DCP shards (a distributed run wrote it)."""
    return (Path(path) / DCP_METADATA).is_file()


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


def read_weights(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint as a state dict on CPU, from ``model.safetensors``, or
    gathered from the DCP shards into ``model`` (a freshly built model of the run's config,
    in one process) when the checkpoint has no consolidated file. A tied matrix appears
    under every name ``model.state_dict()`` gives it."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights}: unreadable ({e})") from e
        if model is not None:  # a tied matrix is stored once: give it its other names
            full = model.state_dict()
            stored = {full[n].data_ptr(): n for n in tensors if n in full}
            for name, t in full.items():
                if name not in tensors and t.data_ptr() in stored:
                    tensors[name] = tensors[stored[t.data_ptr()]]
        return tensors
    if not is_sharded(path):
        raise CheckpointError(f"{path}: neither {WEIGHTS_FILE} nor DCP shards")
    if model is None:
        raise ValueError("reading the weights of a sharded checkpoint needs the model to fill")
    from mxfp8.parallel.dcp import load_sharded

    load_sharded(path, model, None)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


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
