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
    from mxfp8.cli.train import overrides_from_args
    from mxfp8.compare import with_compare_defaults
    from mxfp8.layers.recipe import list_recipes
    from mxfp8.train.config import ConfigError, load_config

    overrides = overrides_from_args(args)
    if "recipe.name" in overrides:
        print("mxfp8 compare: error: use --recipes A,B,... (not --recipe)", file=sys.stderr)
        return 2
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in list_recipes()]
    if not recipes or unknown:
        print(f"mxfp8 compare: error: unknown recipe(s) {unknown or recipes}; choose from "
              f"{', '.join(list_recipes())}", file=sys.stderr)  # fmt: skip
        return 2
    out = overrides.pop("run.out", None) or DEFAULT_OUT
    try:
        base = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"mxfp8 compare: error: {exc}", file=sys.stderr)
        return 2
    return compare_and_print(with_compare_defaults(base, set(overrides)), recipes, out)


def compare_and_print(base: TrainConfig, recipes: Sequence[str], out: str | Path) -> int:
    """Run :func:`mxfp8.compare.compare`, print the table of final results and the report path.

    Shared by ``mxfp8 compare`` and ``mxfp8 demo``. Returns the exit status: 0, 1 when a run
    failed, 2 when the comparison could not start (the reason is printed).
    """
    from mxfp8.compare import CompareError, compare
    from mxfp8.train.config import ConfigError

    try:
        result = compare(base, recipes, out)
    except (ConfigError, CompareError, FileNotFoundError) as exc:
        print(f"mxfp8 compare: error: {exc}", file=sys.stderr)
        return 2
    if result.report is not None:
        print_table(result.out)
    for name, why in result.failed.items():
        print(f"{name}: FAILED: {why}", file=sys.stderr)
    if result.incomplete:
        print(f"stopped early: {', '.join(result.incomplete)}; run the same command again "
              f"to continue", file=sys.stderr)  # fmt: skip
    print(f"report: {result.report}" if result.report else "no report: no run produced data")
    return 1 if result.failed else 0


def print_table(out: str | Path) -> None:
    """Final validation loss, perplexity and gap to the bf16 run of each run in ``out``."""
    from mxfp8.report.html import summary_rows
    from mxfp8.report.loader import load_runs

    rows = summary_rows(load_runs(Path(out)))
    base_row = next((r for r in rows if r["recipe"] == "bf16"), None)
    base_val = base_row["val_loss"] if base_row else None
    print(f"{'recipe':<20} {'steps':>6} {'val loss':>9} {'val ppl':>9} {'gap to bf16':>12}")
    for r in rows:
        val, ppl = r["val_loss"], r["val_ppl"]
        gap = "baseline" if r is base_row else _gap(val, base_val)
        print(
            f"{r['run']:<20} {r['steps'] or '-':>6} "
            f"{'-' if val is None else f'{val:.4f}':>9} "
            f"{'-' if ppl is None else f'{ppl:.2f}':>9} "
            f"{gap:>12}"
        )


def unknown_option_message(option: str) -> str:
    """Compare takes train's config options, so a mistyped one is explained the same way."""
    from mxfp8.cli.train import unknown_option_message as explain

    return explain(option)
