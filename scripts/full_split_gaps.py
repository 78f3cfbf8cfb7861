"""Paired gaps of a multi-seed comparison on the whole validation split, from ``mxfp8 eval``.

``mxfp8 compare`` judges each run by its final validation loss on ``run.eval_batches``
batches of the held-out split (4,096 tokens by default). After scoring every run on the
whole split (``mxfp8 eval CMP/<recipe>/seed<k>``, which appends the loss to that run's
``eval.json``), this prints the same statistics as the comparison's table from those losses:
per recipe the mean and std over seeds, the paired gap to bf16 and to mxfp8 (seed by seed,
in %), its 95 % t-interval and the verdict.

An ``eval.json`` entry counts only when it scores what the comparison means by the run
(:mod:`mxfp8.report.eval_entries`): the run's final checkpoint (its source names the
checkpoint of the run's last step), under the run's recipe, on the run's validation split,
in windows of the run's ``seq_len``, over the whole split (no ``--max-tokens`` cut it short);
the newest such entry. A run without one is listed as missing and left out of the pairs (its
seed then counts for no recipe paired with it), never replaced by another entry.

    python scripts/full_split_gaps.py CMP
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mxfp8.report.stats import mean, paired_gaps, sample_std, t_interval, verdict


def full_split_losses(cmp: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """(recipe -> seed -> whole-split loss of the run's final checkpoint, the runs left out
    with the reason), over the completed seed runs of the comparison ``cmp``."""
    from mxfp8.checkpoint.write import CHECKPOINT_DIR, step_dir_name
    from mxfp8.config.train_config import load_config
    from mxfp8.interop.source import run_split
    from mxfp8.report.eval_entries import whole_split_loss
    from mxfp8.report.loader import load_runs
    from mxfp8.report.stats import is_complete

    out: dict[str, dict[int, float]] = {}
    missing: list[str] = []
    splits: dict[str, tuple] = {}  # runs of one comparison share their data: prepared once
    for run in load_runs(cmp):
        if run.seed is None:
            continue
        if not is_complete(run):
            missing.append(f"{run.name}: not complete")
            continue
        cfg = load_config(run.path / "config.toml")
        step = run.summary["steps"]
        key = repr(cfg.data)
        if key not in splits:
            splits[key] = run_split(cfg)
        tokens, what = splits[key]
        loss = whole_split_loss(run.evaluations, recipe=run.recipe, data=what,
                                checkpoint=run.path / CHECKPOINT_DIR / step_dir_name(step),
                                step=step, n_tokens=len(tokens),
                                seq_len=cfg.run.seq_len)  # fmt: skip
        if loss is None:
            missing.append(f"{run.name}: no whole-split loss of its final checkpoint (step "
                           f"{step}) under {run.recipe} on {what} in eval.json (mxfp8 eval "
                           f"{run.path})")  # fmt: skip
            continue
        out.setdefault(run.key, {})[run.seed] = loss
    return out, missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmp", type=Path, help="the comparison directory (OUT of mxfp8 compare)")
    args = ap.parse_args()
    losses, missing = full_split_losses(args.cmp)
    if missing:
        print("missing, left out of the statistics:\n  " + "\n  ".join(missing))
    if "bf16" not in losses:
        raise SystemExit(f"{args.cmp}: no bf16 run scored on its whole split by mxfp8 eval")
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
            if not gaps:
                print(f"{head} {'-':>9}  no {ref} run of the same seed")
                continue
            iv = t_interval(list(gaps.values()))
            ci = "-" if iv is None else f"[{iv.low:+.2f} %, {iv.high:+.2f} %]"
            per_seed = ", ".join(f"{k}: {g:+.2f}" for k, g in gaps.items())
            print(f"{head} {mean(list(gaps.values())):>+8.2f} % {ci:>20}  "
                  f"{verdict(iv, ref)}  [{per_seed}]")  # fmt: skip


if __name__ == "__main__":
    main()
