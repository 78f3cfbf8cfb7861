"""Statistics over the seeds of a multi-seed comparison (``mxfp8 compare --seeds``).

Per recipe: the mean and sample standard deviation (ddof=1) of the final validation loss; the
*paired* gap to bf16, seed by seed (run minus the bf16 run of the same seed, which saw the same
data order from the same initial weights, relative to it in %); the mean gap with a 95 %
confidence interval from Student's t-distribution with n - 1 degrees of freedom; and a
verdict that the interval alone decides. The t quantile is computed here (no SciPy): the
t CDF through the regularized incomplete beta function (a continued fraction), inverted by
bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mxfp8.report.loader import BASELINE_RECIPE, RunData, by_recipe, paired_baseline

LEVEL = 0.95  # two-sided confidence level of the interval
INDISTINGUISHABLE = "indistinguishable from bf16"
WORSE = "worse"
BETTER = "better"
BASELINE = "baseline"
ONE_SEED = "one seed: no interval"
INTERVAL_NOTE = (
    "95 % confidence interval of the mean paired gap: mean +- t * std / sqrt(n), with t the "
    "0.975 quantile of Student's t-distribution with n - 1 degrees of freedom (n = seeds)"
)
GAP_NOTE = (
    "paired gap, seed by seed: (val loss - bf16 val loss of the same seed) / bf16 val loss "
    "* 100; > 0 is worse"
)
CLOZE = "cloze"
PAIR_REFERENCE = "mxfp8"  # the second reference of a comparison: what the ablations ablate


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float | None:
    """Standard deviation with ddof=1 (None for fewer than two values)."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError("incomplete beta: continued fraction did not converge")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x = {x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))  # fmt: skip
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t-distribution with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = _upper_tail(abs(t), df)
    return 1.0 - tail if t >= 0 else tail


def _upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0: I_x(df/2, 1/2) / 2 with x = df / (df + t^2), through the
    symmetry I_x(a, b) = 1 - I_{1-x}(b, a) when x is near 1 (1 - x computed directly)."""
    a, x, xc = df / 2.0, df / (df + t * t), t * t / (df + t * t)
    if x < (a + 1.0) / (a + 2.5):
        return 0.5 * betainc(a, 0.5, x)
    return 0.5 * (1.0 - betainc(0.5, a, xc))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: the upper tail
    P(T > t) = 1 - p solved by bisection
    (tests: closed forms for df 1, 2 and 4, and SciPy's where installed)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p = {p} outside (0, 1)")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while _upper_tail(hi, df) > tail:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _upper_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A two-sided t confidence interval of a mean."""

    mean: float
    low: float
    high: float
    n: int
    t: float  # the quantile used, t_{(1 + level) / 2, n - 1}
    level: float = LEVEL

    @property
    def df(self) -> int:
        return self.n - 1

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval | None:
    """mean +- t * std / sqrt(n) (t with n - 1 degrees of freedom); None for one value."""
    std = sample_std(values)
    if std is None:
        return None
    n = len(values)
    t = t_quantile(0.5 + level / 2.0, n - 1)
    m = mean(values)
    half = t * std / math.sqrt(n)
    return Interval(mean=m, low=m - half, high=m + half, n=n, t=t, level=level)


def verdict(interval: Interval | None, reference: str = BASELINE_RECIPE) -> str:
    """What the interval of the gap says: it contains 0 (edges included) -> indistinguishable
    (from ``reference``); above 0 -> worse (higher loss); below -> better; no interval (one
    seed) -> no verdict."""
    if interval is None:
        return ONE_SEED
    if interval.low > 0.0:
        return WORSE
    if interval.high < 0.0:
        return BETTER
    return f"indistinguishable from {reference}"


def _gap_pct(loss: float, reference_loss: float) -> float:
    """The relative gap of ``loss`` to the reference's loss of the same seed, in %."""
    return (loss - reference_loss) / reference_loss * 100.0


def paired_gaps(losses: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    """seed -> gap (%) of ``losses`` to ``reference``'s loss of the same seed, for the seeds
    (in ``losses``' order) that the reference has a loss for."""
    return {k: _gap_pct(v, reference[k]) for k, v in losses.items() if reference.get(k)}


def is_complete(run: RunData) -> bool:
    """The run finished its planned steps (summary.json against config.toml)."""
    done = run.summary.get("steps")
    planned = (run.config.get("run") or {}).get("steps")
    if not isinstance(done, int):
        return False
    return done == planned if isinstance(planned, int) else True


def _cloze(run: RunData) -> dict[str, Any] | None:
    """The run's latest cloze scores under its own recipe (eval.json), if any."""
    for e in reversed(run.evaluations):
        task = (e.get("tasks") or {}).get(CLOZE)
        if isinstance(task, dict) and e.get("recipe") in (None, run.recipe):
            return task
    return None


def _number(x: Any) -> float | None:
    ok = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


@dataclass
class RecipeStats:
    """One recipe over its seeds; the gap fields are None for bf16 itself."""

    recipe: str
    seeds: list[int]  # the seeds whose run completed, with a final validation loss
    val_loss: dict[int, float]
    val_loss_mean: float | None
    val_loss_std: float | None
    gap_pct: dict[int, float] = field(default_factory=dict)  # paired, seed by seed
    gap_mean_pct: float | None = None
    interval: Interval | None = None
    verdict: str = ONE_SEED
    incomplete: list[int] = field(default_factory=list)  # seeds left out: not finished
    diverged: list[int] = field(default_factory=list)
    cloze: dict[str, float | None] | None = None  # mean acc_mutual_info / acc over seeds
    cloze_seeds: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        iv = self.interval
        return {
            "seeds": self.seeds,
            "val_loss": {str(k): v for k, v in self.val_loss.items()},
            "val_loss_mean": self.val_loss_mean,
            "val_loss_std": self.val_loss_std,
            "gap_pct": {str(k): v for k, v in self.gap_pct.items()},
            "gap_mean_pct": self.gap_mean_pct,
            "gap_ci95_pct": None if iv is None else [iv.low, iv.high],
            "t_quantile": None if iv is None else iv.t,
            "df": None if iv is None else iv.df,
            "verdict": self.verdict,
            "incomplete_seeds": self.incomplete,
            "diverged_seeds": self.diverged,
            "cloze": None if self.cloze is None else {**self.cloze, "seeds": self.cloze_seeds},
        }


def seed_stats(runs: Sequence[RunData]) -> list[RecipeStats]:
    """The statistics of each recipe over its seeds, in the runs' order. Only completed runs
    count; a recipe's gap pairs each of its seeds with the bf16 run of that seed."""
    out = []
    for recipe, group in by_recipe(runs).items():
        val: dict[int, float] = {}
        gaps: dict[int, float] = {}
        incomplete, diverged = [], []
        cloze_rows: dict[int, dict[str, Any]] = {}
        is_base = all(r.recipe == BASELINE_RECIPE for r in group)
        for run in group:
            seed = run.seed if run.seed is not None else 0
            loss = run.final("final_val_loss")
            if not is_complete(run) or loss is None:
                incomplete.append(seed)
                continue
            val[seed] = loss
            if run.diverged:
                diverged.append(seed)
            if (task := _cloze(run)) is not None:
                cloze_rows[seed] = task
            base = paired_baseline(runs, run)
            base_loss = base.final("final_val_loss") if base and is_complete(base) else None
            if not is_base and base_loss:
                gaps[seed] = _gap_pct(loss, base_loss)
        values = list(val.values())
        st = RecipeStats(
            recipe=recipe,
            seeds=list(val),
            val_loss=val,
            val_loss_mean=mean(values) if values else None,
            val_loss_std=sample_std(values),
            incomplete=incomplete,
            diverged=diverged,
        )
        if is_base:
            st.verdict = BASELINE
        else:
            st.gap_pct = gaps
            st.gap_mean_pct = mean(list(gaps.values())) if gaps else None
            st.interval = t_interval(list(gaps.values()))
            st.verdict = verdict(st.interval) if gaps else "no bf16 run of the same seed"
        if cloze_rows:
            st.cloze_seeds = list(cloze_rows)
            st.cloze = {}
            for metric in ("acc_mutual_info", "acc"):
                xs = [x for t in cloze_rows.values() if (x := _number(t.get(metric))) is not None]
                st.cloze[metric] = mean(xs) if xs else None
        out.append(st)
    return out


@dataclass
class PairStats:
    """One recipe against a reference recipe other than bf16, seed by seed (paired)."""

    recipe: str
    reference: str
    gap_pct: dict[int, float]  # (run - reference of the same seed) / reference * 100
    gap_mean_pct: float | None
    interval: Interval | None
    verdict: str

    def to_json(self) -> dict[str, Any]:
        iv = self.interval
        return {
            "gap_pct": {str(k): v for k, v in self.gap_pct.items()},
            "gap_mean_pct": self.gap_mean_pct,
            "gap_ci95_pct": None if iv is None else [iv.low, iv.high],
            "verdict": self.verdict,
        }


def against(stats: Sequence[RecipeStats], reference: str = PAIR_REFERENCE) -> list[PairStats]:
    """Every recipe of ``stats`` (:func:`seed_stats`) but bf16 and ``reference`` against
    ``reference`` (by default mxfp8, the paper's recipe), paired seed by seed like the gap to
    bf16: is an ablation worse than the recipe it ablates? Empty when no recipe is
    ``reference``."""
    ref = next((s.val_loss for s in stats if s.recipe == reference), None)
    if ref is None:
        return []
    out = []
    for s in stats:
        if s.recipe == reference or s.verdict == BASELINE:
            continue
        gaps = paired_gaps(s.val_loss, ref)
        iv = t_interval(list(gaps.values()))
        text = verdict(iv, reference) if gaps else f"no {reference} run of the same seed"
        out.append(PairStats(s.recipe, reference, gaps,
                             mean(list(gaps.values())) if gaps else None, iv, text))  # fmt: skip
    return out
