"""The ``stats`` section of a comparison's ``comparison.json``: the seed statistics of
:mod:`mxfp8.report.stats`, each ablation against mxfp8, and with a margin the equivalence
verdicts of :mod:`mxfp8.report.equivalence` (which builds on the statistics, hence a module
above both)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mxfp8.report.equivalence import equivalence_json
from mxfp8.report.loader import RunData
from mxfp8.report.stats import (
    GAP_NOTE,
    INTERVAL_NOTE,
    PAIR_REFERENCE,
    against,
    seed_stats,
)


def stats_json(runs: Sequence[RunData], margin: float | None = None) -> dict[str, Any]:
    """What ``comparison.json`` holds about the seeds: the definitions and each recipe; with
    ``margin`` (in %), also each recipe's equivalence to bf16 within it
    (:mod:`mxfp8.report.equivalence`)."""
    stats = seed_stats(runs)
    pairs = against(stats)
    out = {
        "gap": GAP_NOTE,
        "interval": INTERVAL_NOTE,
        "val_loss_std": "sample standard deviation over seeds (ddof=1)",
        "cloze": "mean over seeds of each run's latest cloze scores (eval.json)",
        "recipes": {s.recipe: s.to_json() for s in stats},
    }
    if pairs:
        out[f"against_{PAIR_REFERENCE}"] = {p.recipe: p.to_json() for p in pairs}
    if margin is not None:
        out["equivalence"] = equivalence_json(stats, margin)
    return out
