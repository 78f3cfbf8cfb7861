"""The report's tables of a multi-seed comparison: per recipe over its seeds (loss mean and
std, the paired gap to bf16 with its t-interval and verdict, cloze), each ablation against
mxfp8, seed by seed, and, with a margin, each recipe's equivalence to bf16. Statistics from
:mod:`mxfp8.report.stats` and :mod:`mxfp8.report.equivalence`; HTML cells only here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from mxfp8.report.equivalence import (
    EQUIVALENT,
    NOT_EQUIVALENT,
    SEEDS_NOTE,
    TEST_NOTE,
    equivalences,
)
from mxfp8.report.loader import RunData
from mxfp8.report.stats import (
    BASELINE,
    GAP_NOTE,
    INTERVAL_NOTE,
    PAIR_REFERENCE,
    WORSE,
    RecipeStats,
    against,
    seed_stats,
)

__all__ = ["against_table", "equivalence_table", "fmt", "pct", "seed_table", "verdict_class"]


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "&ndash;"
    return f"{x:.{digits}g}" if abs(x) >= 1e4 else f"{x:.{digits}f}"


def pct(x: float | None) -> str:
    return "&ndash;" if x is None or not math.isfinite(x) else f"{x:+.3f}"


def seed_table(runs: Sequence[RunData], margin: float | None = None) -> str:
    """Per recipe over its seeds: loss mean and std, the mean paired gap with its 95 %
    t-interval, the verdict, the cloze accuracies (a multi-seed comparison only); then each
    ablation against mxfp8 and, with ``margin`` (in %), the equivalence table."""
    stats = seed_stats(runs)
    cloze = any(s.cloze for s in stats)
    head = (
        "<tr><th>recipe</th><th>seeds</th><th>final val loss: mean</th><th>std</th>"
        "<th>paired gap to bf16 (loss %): mean</th><th>95 % confidence interval (t)</th>"
        "<th>verdict</th><th>gap per seed (%)</th>"
        + ("<th>cloze acc_mutual_info / acc (mean)</th>" if cloze else "")
        + "</tr>"
    )
    body = []
    for s in stats:
        iv = s.interval
        ci = "&ndash;" if iv is None else (f"[{pct(iv.low)}, {pct(iv.high)}] "
                                           f"(t = {iv.t:.3f}, {iv.df} df)")  # fmt: skip
        cls = verdict_class(iv, s.verdict)
        verdict = html.escape(s.verdict)
        if s.diverged:
            verdict += f"; diverged on seed {', '.join(map(str, s.diverged))}"
        if s.incomplete:
            verdict += f"; not complete, left out: seed {', '.join(map(str, s.incomplete))}"
        per_seed = ", ".join(f"{k}: {pct(g)}" for k, g in s.gap_pct.items())
        row = (f"<tr><td>{html.escape(s.recipe)}</td>"
               f"<td>{', '.join(map(str, s.seeds)) or '&ndash;'}</td>"
               f"<td>{fmt(s.val_loss_mean)}</td><td>{fmt(s.val_loss_std)}</td>"
               f"<td>{'baseline' if s.verdict == BASELINE else pct(s.gap_mean_pct)}</td>"
               f"<td{cls}>{ci}</td><td{cls}>{verdict}</td>"
               f"<td>{per_seed or '&ndash;'}</td>")  # fmt: skip
        if cloze:
            c = s.cloze or {}
            mi, acc = c.get("acc_mutual_info"), c.get("acc")
            row += (f"<td>{fmt(mi, 3)} / {fmt(acc, 3)} ({len(s.cloze_seeds)} seeds)</td>"
                    if c else "<td>&ndash;</td>")  # fmt: skip
        body.append(row + "</tr>")
    note = (
        f"Over seeds: {html.escape(GAP_NOTE)}. {html.escape(INTERVAL_NOTE)}; std: ddof=1. "
        "Verdict: &ldquo;indistinguishable from bf16&rdquo; when the interval contains 0, "
        "&ldquo;worse&rdquo; when it lies above 0, &ldquo;better&rdquo; below; one seed "
        "gives no interval and no verdict. Only runs that completed their steps count."
    )
    eq = "" if margin is None else equivalence_table(stats, margin)
    return (f'<table class="seeds">{head}{"".join(body)}</table>\n'
            f'<p class="note">{note}</p>\n{against_table(stats)}{eq}'
            "<h3>Runs, seed by seed</h3>")  # fmt: skip


def verdict_class(interval: Any, verdict: str) -> str:
    """The cell class of an interval and its verdict: none without an interval, "bad" when
    worse, else "good"."""
    if interval is None:
        return ""
    return ' class="bad"' if verdict == WORSE else ' class="good"'


def against_table(stats: Sequence[RecipeStats]) -> str:
    """Each ablation against mxfp8, paired seed by seed; empty without an mxfp8 recipe."""
    pairs = against(stats)
    if not pairs:
        return ""
    ref = html.escape(PAIR_REFERENCE)
    rows = []
    for p in pairs:
        iv = p.interval
        ci = "&ndash;" if iv is None else f"[{pct(iv.low)}, {pct(iv.high)}]"
        cls = verdict_class(iv, p.verdict)
        per_seed = ", ".join(f"{k}: {pct(g)}" for k, g in p.gap_pct.items())
        rows.append(f"<tr><td>{html.escape(p.recipe)}</td><td>{pct(p.gap_mean_pct)}</td>"
                    f"<td{cls}>{ci}</td><td{cls}>{html.escape(p.verdict)}</td>"
                    f"<td>{per_seed or '&ndash;'}</td></tr>")  # fmt: skip
    return (
        f'<h3>Against {ref}</h3>\n<table class="seeds"><tr><th>recipe</th>'
        f"<th>paired gap to {ref} (loss %): mean</th><th>95 % confidence interval (t)</th>"
        f"<th>verdict</th><th>gap per seed (%)</th></tr>{''.join(rows)}</table>\n"
        f'<p class="note">The same statistics with {ref} in place of bf16: is an '
        f"ablation worse than the recipe it ablates?</p>\n"
    )


def _test_cell(t: float | None, p: float | None) -> str:
    if p is None:
        return "&ndash;"
    return f"t = {'&ndash;' if t is None else f'{t:+.3f}'}, p = {p:.3g}"


def equivalence_table(stats: Sequence[RecipeStats], margin: float) -> str:
    """Each recipe's equivalence to bf16 within +-``margin`` % (TOST on the paired gaps)."""
    rows = []
    for e in equivalences(stats, margin):
        iv = e.interval
        ci = "&ndash;" if iv is None else (f"[{pct(iv.low)}, {pct(iv.high)}] "
                                           f"(t = {iv.t:.3f}, {iv.df} df)")  # fmt: skip
        cls = {EQUIVALENT: ' class="good"', NOT_EQUIVALENT: ' class="bad"'}.get(e.verdict, "")
        needed = "&ndash;" if not e.seeds_note else html.escape(e.seeds_note)
        rows.append(f"<tr><td>{html.escape(e.recipe)}</td><td>{e.n}</td>"
                    f"<td>{pct(e.gap_mean_pct)}</td><td{cls}>{ci}</td>"
                    f"<td>{_test_cell(e.t_lower, e.p_lower)}</td>"
                    f"<td>{_test_cell(e.t_upper, e.p_upper)}</td>"
                    f"<td{cls}>{html.escape(e.verdict)}</td><td>{needed}</td></tr>")  # fmt: skip
    m = f"{margin:g}"
    return (
        f"<h3>Equivalence to bf16 within &plusmn;{m} %</h3>\n"
        '<table class="seeds"><tr><th>recipe</th><th>seeds</th>'
        "<th>paired gap to bf16 (loss %): mean</th><th>90 % confidence interval (t)</th>"
        f"<th>test of gap &le; &minus;{m} %</th><th>test of gap &ge; +{m} %</th>"
        f"<th>verdict</th><th>seeds needed</th></tr>{''.join(rows)}</table>\n"
        f'<p class="note">Margin &plusmn;{m} % of the validation loss: '
        f"{html.escape(TEST_NOTE)}. p: one-sided, each null rejected at p &le; 0.05. "
        f"{html.escape(SEEDS_NOTE)}.</p>\n"
    )
