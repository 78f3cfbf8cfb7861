"""``mxfp8 compare``: train the same model under several recipes, then write the report.

Takes every option of ``mxfp8 train`` (same generated ``--section.field`` options), plus
``--recipes``, ``--seeds`` (every recipe under each seed, with statistics over them),
``--margin`` (equivalence to bf16 within a margin, over the seeds) and ``--require-equivalent``
(exit status 1 unless every quantized recipe is equivalent); ``--out`` names the comparison
directory.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mxfp8.cli.compare_seeds import all_equivalent, print_seed_stats
from mxfp8.compare import DEFAULT_RECIPES, RECIPE_SETS
from mxfp8.errors import UserError

if TYPE_CHECKING:
    from mxfp8.config.train_config import TrainConfig

DEFAULT_OUT = "runs/compare"
USAGE = "[--recipes A,B,...] [--seeds K,K,... [--margin PCT [--require-equivalent]]]"

DESCRIPTION = """\
Train the same model, from the same seed and on the same data order, under each recipe of
--recipes, one after the other, into OUT/<recipe>/; then write OUT/report.html (loss curves,
gap to bf16, numerics heatmaps, divergence flags) and print its path.

Resumable: run the same command again and finished runs are skipped, interrupted runs resume
from their last checkpoint. With no arguments: bf16 against mxfp8, the tiny model, the
built-in corpus. Telemetry is on (every 100 steps, or steps/4 for short runs) unless
--run.telemetry_every is given; checkpoints every 100 steps unless --run.ckpt_every is.

Seeds: --seeds 0,1,2 runs every recipe under every seed (run.seed = k: the same data order
and initial weights for every recipe of one seed) into OUT/<recipe>/seed<k>/, seed after
seed, resumable as above. The table, OUT/comparison.json and the report then give per recipe
the mean and standard deviation (ddof=1) of the final validation loss over seeds, the paired
gap to bf16 seed by seed ((run - bf16 of the same seed) / bf16, in %), its mean with a 95 %
confidence interval (Student's t, n-1 degrees of freedom) and a verdict: "indistinguishable
from bf16" when the interval contains 0, "worse" when it lies above 0, "better" below; one
seed gives no interval and no verdict. Without --seeds: one run per recipe in OUT/<recipe>/.

Equivalence: --margin PCT (with --seeds) adds, per recipe, two one-sided t tests (TOST) of
the paired gaps against +-PCT %: "equivalent" when the 90 % t interval of the mean gap lies
inside [-PCT, +PCT], "not equivalent" when it lies entirely outside, else "undecided", with the
number of seeds that would likely decide. --require-equivalent then exits with status 1 unless
every quantized recipe (all but bf16 and fp32) is equivalent: a gate for CI."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from mxfp8.cli.train import add_config_options, usage

    p = subparsers.add_parser(
        "compare",
        allow_abbrev=False,
        help="train the same model under several recipes, side by side",
        description=DESCRIPTION,
        usage=usage("compare", USAGE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recipes",
        default=",".join(DEFAULT_RECIPES),
        help="comma-separated recipes to compare (see `mxfp8 recipes`), or a named set: "
        + "; ".join(f"{k} = {','.join(v)}" for k, v in RECIPE_SETS.items())
        + "; all = every preset (default: the default set)",
    )
    p.add_argument(
        "--seeds",
        default=None,
        metavar="K,K,...",
        help="comma-separated distinct non-negative integer seeds: run every recipe under "
        "each (run.seed = k) into OUT/<recipe>/seed<k>/ and report means, paired gaps to bf16 "
        "with 95 %% t-intervals and verdicts over them (default: one run per recipe, "
        "OUT/<recipe>/, at run.seed)",
    )
    p.add_argument(
        "--margin",
        default=None,
        metavar="PCT",
        help="with --seeds: test each recipe's equivalence to bf16 within +-PCT %% of the "
        "validation loss (two one-sided t tests on the paired gaps: equivalent when their 90 %% "
        "t-interval lies inside [-PCT, +PCT]); e.g. --margin 1",
    )
    p.add_argument(
        "--require-equivalent",
        action="store_true",
        help="with --margin: exit with status 1 unless every quantized recipe (all but bf16 "
        "and fp32) is equivalent to bf16",
    )
    p.add_argument(
        "--eval-tasks",
        default="",
        metavar="TASKS",
        help="after training, score each run's final checkpoint on these multiple-choice "
        "tasks, zero-shot and on every item (cloze and/or JSONL files, comma-separated; see "
        "`mxfp8 eval --tasks`); a run whose eval.json holds such scores already is skipped",
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
    from mxfp8.config.train_config import load_config
    from mxfp8.layers.recipe import list_recipes

    overrides = overrides_from_args(args)
    if "recipe.name" in overrides:
        raise UserError("use --recipes A,B,... (not --recipe)")
    recipes = expand_recipes(args.recipes)
    unknown = [r for r in recipes if r not in list_recipes()]
    if not recipes or unknown:
        raise UserError(
            f"unknown recipe(s) {unknown or recipes}; choose from {', '.join(list_recipes())}"
        )
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    if seeds is not None and "run.seed" in overrides:
        raise UserError("give either --seeds K,K,... or --seed / --run.seed, not both")
    margin = None if args.margin is None else parse_margin(args.margin)
    if margin is not None and seeds is None:
        raise UserError("--margin needs --seeds K,K,...: equivalence is tested over seeds")
    out = overrides.pop("run.out", None) or DEFAULT_OUT
    base = load_config(args.config, overrides)
    return compare_and_print(with_compare_defaults(base, set(overrides)), recipes, out,
                             eval_tasks=args.eval_tasks, seeds=seeds, margin=margin,
                             require_equivalent=args.require_equivalent)  # fmt: skip


def parse_margin(spec: str) -> float:
    """The margin of a ``--margin`` value, in %: a finite number > 0."""
    from mxfp8.report.equivalence import check_margin

    try:
        return check_margin(float(spec))
    except ValueError:
        raise UserError(f"--margin: {spec!r} is not a finite number > 0 (the margin, in % of "
                        "the validation loss, e.g. --margin 1)") from None  # fmt: skip


def parse_seeds(spec: str) -> list[int]:
    """The seeds of a ``--seeds`` value: comma-separated distinct non-negative integers."""
    from mxfp8.compare import CompareError, check_seeds

    items = [item.strip() for item in spec.split(",")]
    if not any(items):
        raise UserError("--seeds: no seed given; e.g. --seeds 0,1,2")
    bad = [item for item in items if not item.isdigit()]
    if bad:
        raise UserError(f"--seeds: {', '.join(repr(b) for b in bad)} not a non-negative integer "
                        f"(in {spec!r}); e.g. --seeds 0,1,2")  # fmt: skip
    try:
        return check_seeds([int(item) for item in items])
    except CompareError as exc:
        raise UserError(f"--seeds: {exc}") from None


def expand_recipes(spec: str) -> list[str]:
    """The recipes of a ``--recipes`` value: names and named sets, comma-separated, each
    recipe once, in order."""
    from mxfp8.layers.recipe import list_recipes

    out: list[str] = []
    for item in (r.strip() for r in spec.split(",")):
        if not item:
            continue
        names = list_recipes() if item == "all" else RECIPE_SETS.get(item, (item,))
        out += [n for n in names if n not in out]
    return out


def check_can_start(base: TrainConfig, recipes: Sequence[str], out: str | Path,
                    seeds: Sequence[int] | None = None) -> None:  # fmt: skip
    """Raise a :class:`mxfp8.errors.UserError` now if the comparison cannot start.

    :func:`mxfp8.compare.compare` keeps going when one run fails, so that one bad recipe does
    not lose the others; bad data would fail every run alike, each with a traceback, hence it
    is checked (and prepared, which the first run would do anyway) before any run starts.
    Skipped when every run is already complete: then nothing reads the data.
    """
    from mxfp8.compare import CompareError, plan
    from mxfp8.data.batches import require_tokens
    from mxfp8.data.prepare import prepare_data

    try:
        plans = plan(base, recipes, Path(out), seeds)
    except CompareError as exc:
        raise UserError(str(exc)) from exc
    if all(p.state == "done" for p in plans):
        return
    require_tokens(prepare_data(base.data), base.run.seq_len)


def compare_and_print(base: TrainConfig, recipes: Sequence[str], out: str | Path,
                      eval_tasks: str = "", seeds: Sequence[int] | None = None,
                      margin: float | None = None,
                      require_equivalent: bool = False) -> int:  # fmt: skip
    """Run :func:`mxfp8.compare.compare`, print the table of final results and the report path.

    Shared by ``mxfp8 compare`` and ``mxfp8 demo``. Returns the exit status: 0, 1 when a run
    failed or (``require_equivalent``) a quantized recipe is not shown equivalent to bf16
    within ``margin`` %, or 128 + the signal (143, 130) when SIGTERM / Ctrl-C stopped it after
    a checkpoint. A comparison that cannot start raises a :class:`mxfp8.errors.UserError` (or
    another of :data:`mxfp8.errors.USER_ERRORS`) before any run starts.
    """
    from mxfp8.compare import CompareError, compare

    if require_equivalent and margin is None:
        raise UserError("--require-equivalent needs --margin PCT: equivalent within which margin?")
    check_can_start(base, recipes, out, seeds)
    try:
        result = compare(base, recipes, out, eval_tasks=eval_tasks, seeds=seeds, margin=margin)
    except CompareError as exc:
        raise UserError(str(exc)) from exc
    if result.report is not None:
        print_table(result.out, margin)
    for name, why in result.failed.items():
        print(f"{name}: FAILED: {why}", file=sys.stderr)
    if result.incomplete:
        why = f" by {result.stopped_by}" if result.stopped_by else ""
        print(f"stopped early{why}: {', '.join(result.incomplete)}; run the same command again "
              f"to continue", file=sys.stderr)  # fmt: skip
    print(f"report: {result.report}" if result.report else "no report: no run produced data")
    if result.stopped_by:
        return result.exit_code
    if require_equivalent and margin is not None and not all_equivalent(out, recipes, margin):
        return 1
    return 1 if result.failed else 0


def print_table(out: str | Path, margin: float | None = None) -> None:
    """Final validation loss, perplexity, gap to the bf16 run, steady-state throughput and
    wall time of each run in ``out``; in a multi-seed comparison the gap of each run is to the
    bf16 run of its seed, and the statistics over seeds follow (with ``margin``, the
    equivalence to bf16 within +-``margin`` % too)."""
    from mxfp8.report.html import summary_rows
    from mxfp8.report.loader import is_multi_seed, load_runs

    runs = load_runs(Path(out))
    rows = summary_rows(runs)
    base_rows: dict[Any, dict] = {}  # the bf16 row of each seed (None: single seed)
    for r in rows:
        if r["recipe"] == "bf16":
            base_rows.setdefault(r["seed"], r)
    width = max(20, *(len(str(r["run"])) for r in rows))
    print(f"{'recipe':<{width}} {'steps':>6} {'val loss':>9} {'val ppl':>9} {'gap to bf16':>12} "
          f"{'tok/s':>8} {'wall s':>7}")  # fmt: skip
    for r in rows:
        val, ppl = r["val_loss"], r["val_ppl"]
        base_row = base_rows.get(r["seed"])
        gap = "baseline" if r is base_row else _gap(val, base_row and base_row["val_loss"])
        tps, wall = r["tokens_per_s"], r["wall_time_s"]
        print(
            f"{r['run']:<{width}} {r['steps'] or '-':>6} "
            f"{'-' if val is None else f'{val:.4f}':>9} "
            f"{'-' if ppl is None else f'{ppl:.2f}':>9} "
            f"{gap:>12} {'-' if tps is None else f'{tps:.0f}':>8} "
            f"{'-' if wall is None else f'{wall:.1f}':>7}"
        )
    print("tok/s: steady state (each process's first compile steps left out); wall s: "
          "wall time of the run, set-up and evaluation included")  # fmt: skip
    _print_task_scores(out)
    if is_multi_seed(runs):
        print_seed_stats(runs, margin)


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
