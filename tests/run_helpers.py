"""What the training, resume and kill tests share: a small run's overrides, their command-line
form, metrics without timings, a directory's digest, and the kill -9 harness module."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from mxfp8.train import golden
from mxfp8.train.runlog import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]  # the checkout


def small(out, cache, recipe="bf16", **over):
    """Config overrides of the golden curves' small run, in ``out``, data cached in ``cache``."""
    base = {**golden.OVERRIDES, "data.cache_dir": str(cache), "recipe.name": recipe}
    return {**base, "run.out": str(out), **over}


def cli_args(over: dict) -> list[str]:
    return [a for k, v in over.items() for a in (f"--{k}", str(v))]


def exact(metrics):
    """Metrics rows without the keys that depend on the machine's speed."""
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def tree_digest(root) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes (what 'changed nothing' means)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def kill_harness():
    """``scripts/kill_harness.py`` as a module."""
    spec = importlib.util.spec_from_file_location("kill_harness", ROOT / "scripts/kill_harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
