"""Paired gaps of a multi-seed comparison on the whole validation split, from ``mxfp8 eval``.

``mxfp8 compare`` judges each run by its final validation loss on ``run.eval_batches``
batches of the held-out split (4,096 tokens by default). After scoring every run on the
whole split (``mxfp8 eval CMP/<recipe>/seed<k>``, which appends the loss to that run's
``eval.json``), this prints the same statistics as the comparison's table from those losses:
per recipe the mean and std over seeds, the paired gap to bf16 and to mxfp8 (seed by seed,
in %), its 95 % t-interval and the verdict.

    python scripts/full_split_gaps.py CMP
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mxfp8.report.stats import mean, paired_gaps, sample_std, t_interval, verdict


def full_split_losses(cmp: Path) -> dict[str, dict[int, float]]:
    """recipe -> seed -> loss of the latest whole-split evaluation in ``eval.json``."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(cmp.glob("*/seed*/eval.json")):
        entries = [e for e in json.loads(path.read_text())["evaluations"] if "loss" in e]
        if entries:
            seed = int(path.parent.name.removeprefix("seed"))
            out.setdefault(path.parent.parent.name, {})[seed] = entries[-1]["loss"]
    return {recipe: dict(sorted(by_seed.items())) for recipe, by_seed in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmp", type=Path, help="the comparison directory (OUT of mxfp8 compare)")
    args = ap.parse_args()
    losses = full_split_losses(args.cmp)
    if "bf16" not in losses:
        raise SystemExit(f"{args.cmp}: no bf16 run scored by mxfp8 eval")
    for ref in ("bf16", "mxfp8"):
        if ref not in losses:
            continue
        print(f"\nagainst {ref} (whole validation split; 95 % CI: Student's t, n-1 df)")
        print(f"{'recipe':<18} {'n':>2} {'loss mean +- std':>18} {'gap mean':>9} "
              f"{'95 % CI':>20}  verdict  [gap per seed]")  # fmt: skip
        for recipe, by_seed in losses.items():
            std = sample_std(list(by_seed.values()))
            head = f"{recipe:<18} {len(by_seed):>2} {mean(list(by_seed.values())):>9.4f} +- "
            head += "     -" if std is None else f"{std:.4f}"
            if recipe == ref:
                print(f"{head} {'reference':>9}")
                continue
            gaps = paired_gaps(by_seed, losses[ref])
            iv = t_interval(list(gaps.values()))
            ci = "-" if iv is None else f"[{iv.low:+.2f} %, {iv.high:+.2f} %]"
            per_seed = ", ".join(f"{k}: {g:+.2f}" for k, g in gaps.items())
            print(f"{head} {mean(list(gaps.values())):>+8.2f} % {ci:>20}  "
                  f"{verdict(iv, ref)}  [{per_seed}]")  # fmt: skip


if __name__ == "__main__":
    main()
