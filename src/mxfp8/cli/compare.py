"""``mxfp8 compare``: train the same model under several recipes, then write the report.

Takes every option of ``mxfp8 train`` (same generated ``--section.field`` options), plus
``--recipes``; ``--out`` names the comparison directory.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mxfp8.compare import DEFAULT_RECIPES
from mxfp8.errors import UserError

if TYPE_CHECKING:
    from mxfp8.train.config import TrainConfig

DEFAULT_OUT = "runs/compare"

DESCRIPTION = """\
Train the same model, from the same seed and on the same data order, under each recipe of
--recipes, one after the other, into OUT/<recipe>/; then write OUT/report.html (loss curves,
gap to bf16, numerics heatmaps, divergence flags) and print its path.

Resumable: run the same command again and finished runs are skipped, interrupted runs resume
from their last checkpoint. With no arguments: bf16 against mxfp8, the tiny model, the
built-in corpus. Telemetry is on (every 100 steps, or steps/4 for short runs) unless
--run.telemetry_every is given; checkpoints every 100 steps unless --run.ckpt_every is."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from mxfp8.cli.train import add_config_options, usage

    p = subparsers.add_parser(
        "compare",
        allow_abbrev=False,
        help="train the same model under several recipes, side by side",
        description=DESCRIPTION,
        usage=usage("compare", "[--recipes A,B,...]"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recipes",
        default=",".join(DEFAULT_RECIPES),
        help="comma-separated recipes to compare, e.g. bf16,mxfp8,mxfp8-floor,mxfp8-e5m2-grads "
        f"(see `mxfp8 recipes`; default: {','.join(DEFAULT_RECIPES)})",
    )
    p.add_argument(
        "--eval-tasks",
        default="",
        metavar="TASKS",
        help="after training, score each run's final checkpoint on these multiple-choice "
        "tasks (cloze and/or JSONL files, comma-separated; see `mxfp8 eval --tasks`)",
    )
    add_config_options(
        p,
        out_help="comparison directory, one run directory per recipe in it "
        f"(default: {DEFAULT_OUT})",
        recipe_help="not used by compare: see --recipes",
        resume_help="accepted for symmetry with train: compare always resumes what it can",
    )
    return p


def _gap(value: float | None, base: float | None) -> str:
    if value is None or base is None or not math.isfinite(value) or not base:
        return "-"
    return f"{(value - base) / base * 100:+.2f} %"


def run(args: argparse.Namespace) -> int:
    """Errors are raised, not printed: ``mxfp8.cli.main`` words them (status 2)."""
    from mxfp8.cli.train import overrides_from_args
    from mxfp8.compare import with_compare_defaults
    from mxfp8.layers.recipe import list_recipes
    from mxfp8.train.config import load_config

    overrides = overrides_from_args(args)
    if "recipe.name" in overrides:
        raise UserError("use --recipes A,B,... (not --recipe)")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in list_recipes()]
    if not recipes or unknown:
        raise UserError(
            f"unknown recipe(s) {unknown or recipes}; choose from {', '.join(list_recipes())}"
        )
    out = overrides.pop("run.out", None) or DEFAULT_OUT
    base = load_config(args.config, overrides)
    return compare_and_print(with_compare_defaults(base, set(overrides)), recipes, out,
                             eval_tasks=args.eval_tasks)  # fmt: skip


def check_can_start(base: TrainConfig, recipes: Sequence[str], out: str | Path) -> None:
    """Raise a :class:`mxfp8.errors.UserError` now if the comparison cannot start.

    :func:`mxfp8.compare.compare` keeps going when one run fails, so that one bad recipe does
    not lose the others; bad data would fail every run alike, each with a traceback, hence it
    is checked (and prepared, which the first run would do anyway) before any run starts.
    Skipped when every run is already complete: then nothing reads the data.
    """
    from mxfp8.compare import CompareError, plan
    from mxfp8.train.data import prepare_data, require_tokens

    try:
        plans = plan(base, recipes, Path(out))
    except CompareError as exc:
        raise UserError(str(exc)) from exc
    if all(p.state == "done" for p in plans):
        return
    require_tokens(prepare_data(base.data), base.run.seq_len)


def compare_and_print(base: TrainConfig, recipes: Sequence[str], out: str | Path,
                      eval_tasks: str = "") -> int:  # fmt: skip
    """Run :func:`mxfp8.compare.compare`, print the table of final results and the report path.

    Shared by ``mxfp8 compare`` and ``mxfp8 demo``. Returns the exit status: 0, 1 when a run
    failed, or 128 + the signal (143, 130) when SIGTERM / Ctrl-C stopped it after a
    checkpoint. A comparison that cannot start raises a :class:`mxfp8.errors.UserError` (or
    another of :data:`mxfp8.errors.USER_ERRORS`) before any run starts.
    """
    from mxfp8.compare import CompareError, compare

    check_can_start(base, recipes, out)
    try:
        result = compare(base, recipes, out, eval_tasks=eval_tasks)
    except CompareError as exc:
        raise UserError(str(exc)) from exc
    if result.report is not None:
        print_table(result.out)
    for name, why in result.failed.items():
        print(f"{name}: FAILED: {why}", file=sys.stderr)
    if result.incomplete:
        why = f" by {result.stopped_by}" if result.stopped_by else ""
        print(f"stopped early{why}: {', '.join(result.incomplete)}; run the same command again "
              f"to continue", file=sys.stderr)  # fmt: skip
    print(f"report: {result.report}" if result.report else "no report: no run produced data")
    if result.stopped_by:
        return result.exit_code
    return 1 if result.failed else 0


def print_table(out: str | Path) -> None:
    """Final validation loss, perplexity, gap to the bf16 run, steady-state throughput and
    wall time of each run in ``out``."""
    from mxfp8.report.html import summary_rows
    from mxfp8.report.loader import load_runs

    rows = summary_rows(load_runs(Path(out)))
    base_row = next((r for r in rows if r["recipe"] == "bf16"), None)
    base_val = base_row["val_loss"] if base_row else None
    print(f"{'recipe':<20} {'steps':>6} {'val loss':>9} {'val ppl':>9} {'gap to bf16':>12} "
          f"{'tok/s':>8} {'wall s':>7}")  # fmt: skip
    for r in rows:
        val, ppl = r["val_loss"], r["val_ppl"]
        gap = "baseline" if r is base_row else _gap(val, base_val)
        tps, wall = r["tokens_per_s"], r["wall_time_s"]
        print(
            f"{r['run']:<20} {r['steps'] or '-':>6} "
            f"{'-' if val is None else f'{val:.4f}':>9} "
            f"{'-' if ppl is None else f'{ppl:.2f}':>9} "
            f"{gap:>12} {'-' if tps is None else f'{tps:.0f}':>8} "
            f"{'-' if wall is None else f'{wall:.1f}':>7}"
        )
    print("tok/s: steady state (each process's first compile steps left out); wall s: "
          "wall time of the run, set-up and evaluation included")  # fmt: skip
    _print_task_scores(out)


def _print_task_scores(out: str | Path) -> None:
    """acc / acc_norm / acc_mutual_info (+- standard error) of each run's latest task
    evaluation, if any."""
    from mxfp8.report.html import eval_rows
    from mxfp8.report.loader import load_runs

    latest: dict[str, dict] = {}
    for row in eval_rows(load_runs(Path(out))):
        if any(isinstance(v, tuple) for v in row.values()):
            latest[str(row["run"])] = row
    for run, row in latest.items():
        scores = ", ".join(
            f"{k} acc {v[0]:.3f} +- {v[1]:.3f} (acc_norm {v[2]:.3f} +- {v[3]:.3f}"
            + ("" if v[5] is None else f", acc_mutual_info {v[5]:.3f} +- {v[6]:.3f}")
            + f", {v[4]} items)"
            for k, v in row.items()
            if isinstance(v, tuple)
        )
        print(f"{run:<20} {scores}")


def unknown_option_message(option: str) -> str:
    """Compare takes train's config options, so a mistyped one is explained the same way."""
    from mxfp8.cli.train import unknown_option_message as explain

    return explain(option)
