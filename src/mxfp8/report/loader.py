"""Read run directories from disk, for reports.

Reports only read what training wrote (see the run-directory table in docs/architecture.md),
so a report can be made for an old run, a run copied from another machine, or a comparison
of several. Nothing here imports the training code.

A *run directory* holds some of ``config.toml``, ``metrics.jsonl``, ``numerics.jsonl``,
``events.jsonl`` and ``summary.json``. A *comparison directory* holds run directories, one per
recipe, and optionally ``comparison.json`` (``{"recipes": [...]}``) giving their order.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxfp8.stats.jsonl import read_rows

EVAL_FILE = "eval.json"  # written by `mxfp8 eval` (and `mxfp8 compare --eval-tasks`)
RUN_FILES = ("config.toml", "metrics.jsonl", "numerics.jsonl", "events.jsonl", "summary.json")
COMPARISON_INDEX = "comparison.json"
BASELINE_RECIPE = "bf16"


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
    return obj if isinstance(obj, dict) else {}


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


def load_run(path: str | Path) -> RunData:
    """Parse one run directory."""
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
        name=path.name,
        path=path,
        config_text=text,
        config=config,
        metrics=read_jsonl(path / "metrics.jsonl"),
        numerics=read_jsonl(path / "numerics.jsonl"),
        events=read_jsonl(path / "events.jsonl"),
        summary=_read_json(path / "summary.json"),
        evaluations=_evaluations(path / EVAL_FILE),
    )


def _evaluations(path: Path) -> list[dict[str, Any]]:
    evals = _read_json(path).get("evaluations", [])
    return [e for e in evals if isinstance(e, dict)] if isinstance(evals, list) else []


def _child_runs(path: Path) -> Iterator[Path]:
    for child in sorted(path.iterdir()):
        if is_run_dir(child):
            yield child


def load_runs(path: str | Path) -> list[RunData]:
    """The runs of a run directory (one) or of a comparison directory (several).

    Order: the one in comparison.json if present, else the bf16 baseline first and the rest
    by name, so plots and tables read the same way every time.
    """
    path = Path(path)
    if is_run_dir(path):
        return [load_run(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    runs = [load_run(p) for p in _child_runs(path)]
    if not runs:
        raise FileNotFoundError(f"{path} holds no run directory")
    order = _read_json(path / COMPARISON_INDEX).get("recipes")
    if isinstance(order, list):
        rank = {str(name): i for i, name in enumerate(order)}
        return sorted(runs, key=lambda r: (rank.get(r.name, len(rank)), r.name))
    return sorted(runs, key=lambda r: (r.recipe != BASELINE_RECIPE, r.name))


def baseline(runs: list[RunData]) -> RunData | None:
    """The bf16 run of a comparison, if there is one."""
    return next((r for r in runs if r.recipe == BASELINE_RECIPE), None)
