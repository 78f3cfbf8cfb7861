"""The terminal tables of a multi-seed comparison (``mxfp8 compare --seeds``): the statistics
over seeds, each ablation against mxfp8, the equivalence to bf16 within ``--margin``; and the
``--require-equivalent`` gate. Statistics from :mod:`mxfp8.report.stats` and
:mod:`mxfp8.report.equivalence`; text only here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f} %"


def print_seed_stats(runs: Sequence[Any], margin: float | None = None) -> None:
    """Per recipe, over its seeds: validation loss mean +- std, the mean paired gap to bf16
    with its 95 % t-interval, the verdict, and the cloze accuracy (mean) where evaluated; each
    ablation against mxfp8; with ``margin``, each recipe's equivalence to bf16."""
    from mxfp8.report.stats import seed_stats

    stats = seed_stats(runs)
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    print(f"\nover seeds {', '.join(map(str, seeds))}: val loss mean +- std (ddof=1); gap: paired, "
          "(run - bf16 of the same seed) / bf16 of that seed; 95 % CI of the mean gap: Student's "
          "t, n-1 degrees of freedom (n = seeds with a complete run)")  # fmt: skip
    cloze = any(s.cloze for s in stats)
    width = max(20, *(len(s.recipe) for s in stats))
    print(
        f"{'recipe':<{width}} {'n':>2} {'val loss mean +- std':>21} {'gap mean':>9} "
        f"{'95 % CI of gap':>21}  verdict" + ("  [cloze acc_mutual_info / acc]" if cloze else "")
    )
    for s in stats:
        loss = "-" if s.val_loss_mean is None else f"{s.val_loss_mean:.4f}"
        if s.val_loss_std is not None:
            loss += f" +- {s.val_loss_std:.4f}"
        gap = "baseline" if s.verdict == "baseline" else _pct(s.gap_mean_pct)
        iv = s.interval
        ci = "-" if iv is None else f"[{_pct(iv.low)}, {_pct(iv.high)}]"
        line = f"{s.recipe:<{width}} {len(s.seeds):>2} {loss:>21} {gap:>9} {ci:>21}  {s.verdict}"
        if s.diverged:
            line += f" (diverged: seed {', '.join(map(str, s.diverged))})"
        if s.incomplete:
            line += f" (not complete, left out: seed {', '.join(map(str, s.incomplete))})"
        if cloze and s.cloze:
            mi, acc = s.cloze.get("acc_mutual_info"), s.cloze.get("acc")
            mi_text = "-" if mi is None else f"{mi:.3f}"
            acc_text = "-" if acc is None else f"{acc:.3f}"
            line += f"  [{mi_text} / {acc_text}, {len(s.cloze_seeds)} seeds]"
        print(line)
    _print_against(stats, width)
    if margin is not None:
        _print_equivalence(stats, width, margin)


def _print_equivalence(stats: Sequence[Any], width: int, margin: float) -> None:
    """Each recipe's TOST against +-``margin`` %: the 90 % interval, the two one-sided tests,
    the verdict and, when undecided, the seeds that would likely decide."""
    from mxfp8.report.equivalence import equivalences

    print(f"\nequivalence to bf16 within +-{margin:g} % (two one-sided t tests at 5 %: "
          "equivalent when the 90 % t interval of the mean paired gap lies inside the margin, "
          "not equivalent when entirely outside, else undecided)")  # fmt: skip
    print(f"{'recipe':<{width}} {'n':>2} {'gap mean':>9} {'90 % CI of gap':>21} "
          f"{'t low (p)':>16} {'t up (p)':>16}  verdict")  # fmt: skip
    for e in equivalences(stats, margin):
        iv = e.interval
        ci = "-" if iv is None else f"[{_pct(iv.low)}, {_pct(iv.high)}]"
        tests = [_test(t, p) for t, p in ((e.t_lower, e.p_lower), (e.t_upper, e.p_upper))]
        line = (f"{e.recipe:<{width}} {e.n:>2} {_pct(e.gap_mean_pct):>9} {ci:>21} "
                f"{tests[0]:>16} {tests[1]:>16}  {e.verdict}")  # fmt: skip
        print(line + (f": {e.seeds_note}" if e.seeds_note else ""))


def _test(t: float | None, p: float | None) -> str:
    if p is None:
        return "-"
    return f"{'-' if t is None else f'{t:+.2f}'} ({p:.3g})"


def _print_against(stats: Sequence[Any], width: int) -> None:
    """Each ablation against mxfp8, paired seed by seed (when mxfp8 is in the comparison)."""
    from mxfp8.report.stats import PAIR_REFERENCE, against

    pairs = against(stats)
    if not pairs:
        return
    print(f"\nagainst {PAIR_REFERENCE}, paired the same way: (run - {PAIR_REFERENCE} of the "
          f"same seed) / {PAIR_REFERENCE} of that seed")  # fmt: skip
    for p in pairs:
        iv = p.interval
        ci = "-" if iv is None else f"[{_pct(iv.low)}, {_pct(iv.high)}]"
        print(f"{p.recipe:<{width}} {len(p.gap_pct):>2} {'':>21} {_pct(p.gap_mean_pct):>9} "
              f"{ci:>21}  {p.verdict}")  # fmt: skip


def all_equivalent(out: str | Path, recipes: Sequence[str], margin: float) -> bool:
    """Whether every quantized recipe of ``recipes`` is equivalent to bf16 within ``margin``
    %; if not, says which and why on stderr (what ``--require-equivalent`` gates on)."""
    from mxfp8.report.equivalence import equivalences, not_equivalent
    from mxfp8.report.loader import load_runs
    from mxfp8.report.stats import seed_stats

    try:
        runs = load_runs(Path(out))
    except FileNotFoundError:
        runs = []
    failing = not_equivalent(equivalences(seed_stats(runs), margin), recipes)
    if failing:
        why = "; ".join(f"{r} ({text})" for r, text in failing.items())
        print(f"--require-equivalent: not equivalent to bf16 within +-{margin:g} %: {why}",
              file=sys.stderr)  # fmt: skip
    return not failing
