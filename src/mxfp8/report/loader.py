"""Read run directories from disk, for reports.

Reports only read what training wrote (see the run-directory table in docs/architecture.md),
so a report can be made for an old run, a run copied from another machine, or a comparison
of several. Nothing here imports the training code.

A *run directory* holds some of ``config.toml``, ``metrics.jsonl``, ``numerics.jsonl``,
``events.jsonl`` and ``summary.json``. A *comparison directory* holds run directories, one per
recipe, and optionally ``comparison.json`` (``{"recipes": [...]}``) giving their order. A
*multi-seed* comparison (``mxfp8 compare --seeds``) holds one directory per recipe and in it one
run directory per seed, ``<recipe>/seed<k>/``; those runs are named ``<recipe>/seed<k>``.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxfp8.stats.jsonl import decode_row, read_rows

EVAL_FILE = "eval.json"  # written by `mxfp8 eval` (and `mxfp8 compare --eval-tasks`)
RUN_FILES = ("config.toml", "metrics.jsonl", "numerics.jsonl", "events.jsonl", "summary.json")
COMPARISON_INDEX = "comparison.json"
BASELINE_RECIPE = "bf16"
SEED_DIR = re.compile(r"seed(\d+)")  # <recipe>/seed<k>/ of a multi-seed comparison


def seed_dir_name(seed: int) -> str:
    """The directory of seed ``seed`` under a recipe's directory: ``seed<k>``."""
    return f"seed{seed}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All JSON objects of a .jsonl file; a missing file gives [], and a truncated last line
    (a run killed mid-write) is skipped rather than failing the whole report, with a
    :class:`~mxfp8.stats.jsonl.CorruptLineWarning` naming the file and line. The reader is the
    one training uses (:func:`mxfp8.stats.jsonl.read_rows`), so a report and a resumed run
    never disagree on what a file holds."""
    return read_rows(path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return decode_row(obj) if isinstance(obj, dict) else {}


def _finite(x: Any) -> float | None:
    """x as a float if it is a finite number, else None (NaN/inf/missing/strings)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class RunData:
    """Everything one run directory holds, parsed. Missing files give empty fields."""

    name: str
    path: Path
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    numerics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # eval.json (mxfp8 eval)
    seed: int | None = None  # the k of <recipe>/seed<k>/ (multi-seed comparisons), else None
    group: str | None = None  # the <recipe> directory holding that seed directory

    @property
    def key(self) -> str:
        """What the runs of one recipe share over seeds: the recipe directory, else the name."""
        return self.group if self.group is not None else self.name

    @property
    def recipe(self) -> str:
        """The recipe name: summary.json, else the config's recipe, else the directory name."""
        if isinstance(self.summary.get("recipe"), str):
            return self.summary["recipe"]
        rec = self.config.get("recipe")
        if isinstance(rec, str):
            return rec
        if isinstance(rec, dict) and isinstance(rec.get("name"), str):
            return rec["name"]
        return self.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of metrics rows that carry ``key``; non-finite values kept as NaN
        so that a curve shows where a run blew up instead of silently skipping it."""
        steps, values = [], []
        for row in self.metrics:
            if key in row and "step" in row:
                v = row[key]
                if v is None or isinstance(v, str):  # JSON has no NaN: writers may emit null
                    v = float("nan")
                steps.append(int(row["step"]))
                values.append(float(v))
        return steps, values

    def last(self, key: str) -> float | None:
        """The last finite value of a metric, or None."""
        for row in reversed(self.metrics):
            v = _finite(row.get(key))
            if v is not None:
                return v
        return None

    def final(self, key: str) -> float | None:
        """summary.json's ``key`` when present, else the last logged ``key`` metric."""
        v = _finite(self.summary.get(key))
        if v is not None:
            return v
        return self.last(key.removeprefix("final_"))

    @property
    def diverged(self) -> bool:
        """The run ended diverged (summary.json), or, before it ended, flagged a NaN loss."""
        if "diverged" in self.summary:
            return bool(self.summary["diverged"])
        return any(e.get("kind") == "nan" for e in self.events)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def load_run(path: str | Path, *, seed: int | None = None, group: str | None = None) -> RunData:
    """Parse one run directory (named ``group/<dir>`` when it is a seed of ``group``)."""
    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path} is not a run directory (none of {', '.join(RUN_FILES)})")
    cfg_path = path / "config.toml"
    text, config = "", {}
    if cfg_path.is_file():
        text = cfg_path.read_text(encoding="utf-8")
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            config = {}
    return RunData(
        name=path.name if group is None else f"{group}/{path.name}",
        path=path,
        config_text=text,
        config=config,
        metrics=read_jsonl(path / "metrics.jsonl"),
        numerics=read_jsonl(path / "numerics.jsonl"),
        events=read_jsonl(path / "events.jsonl"),
        summary=_read_json(path / "summary.json"),
        evaluations=_evaluations(path / EVAL_FILE),
        seed=seed,
        group=group,
    )


def _evaluations(path: Path) -> list[dict[str, Any]]:
    evals = _read_json(path).get("evaluations", [])
    return [e for e in evals if isinstance(e, dict)] if isinstance(evals, list) else []


def _child_runs(path: Path) -> Iterator[Path]:
    for child in sorted(path.iterdir()):
        if is_run_dir(child):
            yield child


def seed_runs(path: Path) -> list[tuple[int, Path]]:
    """``(k, path / seed<k>)`` for each seed run directory under ``path``, by seed."""
    if not path.is_dir():
        return []
    found = []
    for child in path.iterdir():
        m = SEED_DIR.fullmatch(child.name)
        if m and is_run_dir(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def _comparison_runs(path: Path, seeds: list | None) -> list[RunData]:
    """The run directories of a comparison directory, and the seed runs of its recipe
    directories (``<recipe>/seed<k>/``; only those of ``seeds`` when given)."""
    runs = []
    for child in sorted(path.iterdir()):
        if is_run_dir(child):
            runs.append(load_run(child))
        else:
            runs += [load_run(d, seed=k, group=child.name) for k, d in seed_runs(child)
                     if seeds is None or k in seeds]  # fmt: skip
    return runs


def load_runs(path: str | Path) -> list[RunData]:
    """The runs of a run directory (one) or of a comparison directory (several).

    Order: the one in comparison.json if present, else the bf16 baseline first and the rest
    by name, so plots and tables read the same way every time; each recipe's seeds in seed
    order. When comparison.json lists ``seeds``, seed directories of other seeds are left out.
    """
    path = Path(path)
    if is_run_dir(path):
        return [load_run(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    index = _read_json(path / COMPARISON_INDEX)
    seeds = index.get("seeds")
    runs = _comparison_runs(path, seeds if isinstance(seeds, list) else None)
    if not runs:
        raise FileNotFoundError(f"{path} holds no run directory")
    order = index.get("recipes")
    if isinstance(order, list):  # then each recipe's seeds in seed order
        rank = {str(name): i for i, name in enumerate(order)}
        return sorted(runs, key=lambda r: (rank.get(r.key, len(rank)), r.key, r.seed or 0))
    return sorted(runs, key=lambda r: (r.recipe != BASELINE_RECIPE, r.key, r.seed or 0))


def baseline(runs: list[RunData]) -> RunData | None:
    """The bf16 run of a comparison, if there is one."""
    return next((r for r in runs if r.recipe == BASELINE_RECIPE), None)


def paired_baseline(runs: Sequence[RunData], run: RunData) -> RunData | None:
    """The bf16 run of ``run``'s seed (same seed: same data order, same initial weights); in a
    single-seed comparison, where no run has a seed, the bf16 run."""
    return next((r for r in runs if r.recipe == BASELINE_RECIPE and r.seed == run.seed), None)


def is_multi_seed(runs: Sequence[RunData]) -> bool:
    """Whether the runs come from a multi-seed comparison (``<recipe>/seed<k>/``)."""
    return any(r.seed is not None for r in runs)


def by_recipe(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """The runs grouped by recipe directory (:attr:`RunData.key`), in the runs' order."""
    groups: dict[str, list[RunData]] = {}
    for r in runs:
        groups.setdefault(r.key, []).append(r)
    return groups
