"""The paired gap of two sets of runs of the same seeds: how far one configuration's final
validation loss is from another's, seed by seed, with intervals.

``mxfp8 compare`` pairs recipes; two configurations of one recipe (``--memory lean`` against
the default, say) are two directories of ``seed<k>`` runs. For each seed both hold:
(run - reference) / reference in %, then the mean with its 95 % t interval (the comparison's
verdict rule) and, with ``--margin``, the 90 % interval of the two one-sided tests.

Usage: python scripts/paired_gap.py RUNS REFERENCE_RUNS [--margin PCT]
  e.g. python scripts/paired_gap.py runs/lean runs/results/mxfp8 --margin 1
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mxfp8.report.equivalence import tost
from mxfp8.report.stats import mean, paired_gaps, sample_std, t_interval


def final_losses(root: Path) -> dict[int, float]:
    """seed -> final validation loss of every finished ``seed<k>`` run under ``root``."""
    out = {}
    for d in sorted(root.glob("seed*")):
        m = re.fullmatch(r"seed(\d+)", d.name)
        summary = d / "summary.json"
        if m and summary.is_file():
            loss = json.loads(summary.read_text()).get("final_val_loss")
            if isinstance(loss, int | float):
                out[int(m.group(1))] = float(loss)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--margin", type=float, default=None, help="equivalence margin, %%")
    args = ap.parse_args(argv)
    runs, ref = final_losses(args.runs), final_losses(args.reference)
    gaps = paired_gaps(runs, ref)
    if not gaps:
        print(f"no seed has a finished run in both {args.runs} and {args.reference}")
        return 1
    print(f"{'seed':>4} {'loss':>8} {'reference':>9} {'gap %':>7}")
    for seed, gap in sorted(gaps.items()):
        print(f"{seed:>4} {runs[seed]:8.4f} {ref[seed]:9.4f} {gap:+7.2f}")
    values = [gaps[s] for s in sorted(gaps)]
    sd = sample_std(values)
    ci = t_interval(values)
    line = f"mean gap {mean(values):+.2f} %"
    if sd is not None:
        line += f", std {sd:.2f} %"
    if ci is not None:
        line += f", 95 % CI [{ci.low:+.2f}, {ci.high:+.2f}] % over {len(values)} seeds"
    print(line)
    if args.margin is not None and len(values) > 1:
        eq = tost("runs", values, args.margin)
        print(f"equivalence within +-{args.margin} %: {eq.verdict} (90 % CI "
              f"[{eq.interval.low:+.2f}, {eq.interval.high:+.2f}] %)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
