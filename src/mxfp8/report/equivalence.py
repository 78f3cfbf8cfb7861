"""Equivalence to bf16 within a margin (``mxfp8 compare --seeds ... --margin PCT``): two
one-sided t tests (TOST) on the paired gaps of :func:`mxfp8.report.stats.seed_stats`.

The gaps are those of the comparison's table: seed by seed, (run - bf16 run of the same seed)
/ that bf16 run, in %, > 0 worse. With n seeds, mean m, standard deviation s (ddof=1) and
se = s / sqrt(n), T Student's t with n - 1 degrees of freedom and the margin d (in %):

- lower test, H0: mean gap <= -d: t_lower = (m + d) / se, p_lower = P(T >= t_lower);
- upper test, H0: mean gap >= +d: t_upper = (m - d) / se, p_upper = P(T <= t_upper).

Both nulls rejected at 5 % (p <= 0.05) is the same as the 90 % two-sided t interval of the
mean, m +- t_{0.95, n-1} * se, lying inside [-d, +d]: each one-sided test at 5 % uses one end
of that interval. The verdict is read off the interval:

- **equivalent**: the interval lies inside [-d, +d] (edges included);
- **not equivalent**: the interval lies entirely above +d or entirely below -d;
- **undecided**: otherwise (it straddles -d or +d); one seed gives no interval: "undecided
  (one seed)".

Seeds needed (undecided only): the smallest total number of seeds n' that would decide, if
the mean gap and its standard deviation stayed the observed m and s:

- |m| < d: the smallest n' with |m| + t_{0.95, n'-1} * s / sqrt(n') <= d (would show
  equivalence);
- |m| > d: the smallest n' with |m| - t_{0.95, n'-1} * s / sqrt(n') > d (would show
  non-equivalence; no number of seeds shows equivalence at such a mean);
- |m| = d: none (the interval straddles the margin at every n').

Searched up to :data:`MAX_SEEDS` (t_{0.95, n'-1} / sqrt(n') falls with n', so by bisection);
beyond it the estimate says "more than". An estimate, not a promise: more seeds also move m
and s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mxfp8.report.stats import (
    BASELINE,
    Interval,
    RecipeStats,
    mean,
    sample_std,
    t_cdf,
    t_interval,
    t_quantile,
)

ALPHA = 0.05  # level of each one-sided test
LEVEL = 1.0 - 2.0 * ALPHA  # the two-sided interval whose ends are the two tests: 90 %
EQUIVALENT = "equivalent"
NOT_EQUIVALENT = "not equivalent"
UNDECIDED = "undecided"
ONE_SEED = "undecided (one seed)"
NO_PAIR = "undecided (no bf16 run of the same seed)"
MAX_SEEDS = 1000
UNGATED = ("bf16", "fp32")  # not quantized: --require-equivalent does not ask them
TEST_NOTE = (
    "two one-sided t tests (TOST) at 5 % each on the paired gaps: equivalent when the 90 % "
    "two-sided t interval of the mean gap (mean +- t_{0.95, n-1} * std / sqrt(n)) lies inside "
    "[-margin, +margin], not equivalent when it lies entirely outside, else undecided"
)
SEEDS_NOTE = (
    "seeds needed (undecided only): the smallest total n' with |mean| + t_{0.95, n'-1} * std "
    "/ sqrt(n') <= margin when |mean| < margin (to show equivalence), or |mean| - t_{0.95, "
    "n'-1} * std / sqrt(n') > margin when |mean| > margin (to show non-equivalence), at the "
    "observed mean and std"
)


def check_margin(margin: float) -> float:
    """``margin`` (in %) if it is a finite number > 0, else a ValueError."""
    ok = isinstance(margin, int | float) and not isinstance(margin, bool)
    if not ok or not math.isfinite(margin) or margin <= 0:
        raise ValueError(f"the equivalence margin must be a finite number > 0 (in %), "
                         f"got {margin!r}")  # fmt: skip
    return float(margin)


@dataclass(frozen=True)
class Equivalence:
    """The TOST of one recipe's paired gaps against +-``margin`` (see the module doc)."""

    recipe: str
    margin: float  # in %
    n: int  # paired seeds
    gap_mean_pct: float | None
    interval: Interval | None  # the 90 % two-sided t interval of the mean gap
    t_lower: float | None  # (mean + margin) / se; None without an interval, or with std 0
    t_upper: float | None  # (mean - margin) / se
    p_lower: float | None  # P(T >= t_lower): the test of mean <= -margin
    p_upper: float | None  # P(T <= t_upper): the test of mean >= +margin
    verdict: str
    seeds_needed: int | None  # undecided only: see the module doc
    seeds_note: str  # the estimate in words ("" when decided)

    def to_json(self) -> dict[str, Any]:
        iv = self.interval
        return {
            "n": self.n,
            "gap_mean_pct": self.gap_mean_pct,
            "ci90_pct": None if iv is None else [iv.low, iv.high],
            "t_quantile": None if iv is None else iv.t,
            "df": None if iv is None else iv.df,
            "t_lower": self.t_lower,
            "p_lower": self.p_lower,
            "t_upper": self.t_upper,
            "p_upper": self.p_upper,
            "verdict": self.verdict,
            "seeds_needed": self.seeds_needed,
            "seeds_note": self.seeds_note,
        }


def equivalence_verdict(interval: Interval | None, margin: float) -> str:
    """What the 90 % interval says against +-``margin`` (edges of the margin count as
    inside); no interval (one seed) -> undecided."""
    if interval is None:
        return ONE_SEED
    if -margin <= interval.low and interval.high <= margin:
        return EQUIVALENT
    if interval.low > margin or interval.high < -margin:
        return NOT_EQUIVALENT
    return UNDECIDED


def _half_width(sd: float, n: int) -> float:
    return t_quantile(1.0 - ALPHA, n - 1) * sd / math.sqrt(n)


def seeds_needed(gap_mean: float, sd: float, margin: float, n: int) -> tuple[int | None, str]:
    """(total seeds n' that would likely decide, the estimate in words), for an undecided
    test of ``n`` seeds with mean gap ``gap_mean`` and std ``sd`` (formulas: the module doc)."""
    m = abs(gap_mean)
    if m == margin:
        return None, "no number of seeds decides: the mean gap lies on the margin"
    if m < margin:
        goal, why_not = "equivalence", ""

        def decides(k: int) -> bool:
            return m + _half_width(sd, k) <= margin
    else:
        goal = "non-equivalence"
        why_not = "; no number of seeds shows equivalence at a mean gap beyond the margin"

        def decides(k: int) -> bool:
            return m - _half_width(sd, k) > margin

    if not decides(MAX_SEEDS):
        return None, f"more than {MAX_SEEDS} seeds would be needed to show {goal}{why_not}"
    lo, hi = max(n, 1), MAX_SEEDS  # decides(hi); not decides(lo): the test is undecided at n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if decides(mid) else (mid, hi)
    return hi, (f"about {hi} seeds in all would likely show {goal}, at the observed mean and "
                f"std{why_not}")  # fmt: skip


def tost(recipe: str, gaps: Sequence[float], margin: float) -> Equivalence:
    """The TOST of ``gaps`` (paired, in %) against +-``margin`` (in %)."""
    margin = check_margin(margin)
    n = len(gaps)
    if n < 2:
        return Equivalence(recipe, margin, n, mean(gaps) if gaps else None, None, None, None,
                           None, None, ONE_SEED if gaps else NO_PAIR, None,
                           "a second seed gives a first interval" if gaps else "")  # fmt: skip
    m, sd = mean(gaps), sample_std(gaps)
    assert sd is not None
    iv = t_interval(gaps, level=LEVEL)
    assert iv is not None
    se = sd / math.sqrt(n)
    if se > 0:
        t_lo, t_hi = (m + margin) / se, (m - margin) / se
        p_lo, p_hi = t_cdf(-t_lo, n - 1), t_cdf(t_hi, n - 1)  # P(T >= t) = P(T <= -t)
    else:  # every seed the same gap: each null is rejected outright or not at all
        t_lo = t_hi = None
        p_lo, p_hi = float(m < -margin), float(m > margin)
    text = equivalence_verdict(iv, margin)
    needed, note = seeds_needed(m, sd, margin, n) if text == UNDECIDED else (None, "")
    return Equivalence(recipe, margin, n, m, iv, t_lo, t_hi, p_lo, p_hi, text, needed, note)


def equivalences(stats: Sequence[RecipeStats], margin: float) -> list[Equivalence]:
    """The TOST of every recipe of ``stats`` (:func:`~mxfp8.report.stats.seed_stats`) but the
    bf16 baseline, on its paired gaps to bf16."""
    return [tost(s.recipe, list(s.gap_pct.values()), margin)
            for s in stats if s.verdict != BASELINE]  # fmt: skip


def not_equivalent(eqs: Sequence[Equivalence], recipes: Sequence[str]) -> dict[str, str]:
    """recipe -> why, for each of ``recipes`` but :data:`UNGATED` (the quantized ones) that
    is not shown equivalent: what ``--require-equivalent`` refuses."""
    by_recipe = {e.recipe: e for e in eqs}
    out = {}
    for r in recipes:
        if r in UNGATED:
            continue
        e = by_recipe.get(r)
        if e is None:
            out[r] = "no complete run"
        elif e.verdict != EQUIVALENT:
            out[r] = e.verdict + (f"; {e.seeds_note}" if e.seeds_note else "")
    return out


def equivalence_json(stats: Sequence[RecipeStats], margin: float) -> dict[str, Any]:
    """What ``comparison.json`` holds about equivalence (``stats.equivalence``)."""
    return {
        "margin_pct": check_margin(margin),
        "level": LEVEL,
        "test": TEST_NOTE,
        "seeds_needed": SEEDS_NOTE,
        "recipes": {e.recipe: e.to_json() for e in equivalences(stats, margin)},
    }
