"""Train the same model under several recipes, side by side, then write the report.

Same model, same seed, same data order: every run is the base config with only
``recipe.name`` and ``run.out`` changed, so their loss curves differ by the recipe alone.
Runs go one after the other into ``OUT/<recipe>/`` and the comparison is resumable:

- a run whose ``summary.json`` says it completed the planned steps is skipped;
- a run with a checkpoint is resumed from it (bit-identical to an uninterrupted run);
- a run that left files but no checkpoint is started again from scratch;
- a run directory holding a run of a *different* config is an error, never overwritten.

With ``seeds`` (``mxfp8 compare --seeds 0,1,2``), every recipe runs under every seed
(``run.seed = k``: one seed, one data order and one set of initial weights for every recipe)
into ``OUT/<recipe>/seed<k>/``, seed after seed, each run resumed or skipped as above. A
directory of the other layout (a single-seed run where seeds are asked for, or the reverse) is
an error.

Then ``OUT/comparison.json`` (the recipe order; with seeds, also the seeds and the statistics
over them: :func:`mxfp8.report.comparison_stats.stats_json`) and ``OUT/report.html`` are
written. With ``eval_tasks`` (``mxfp8 compare --eval-tasks cloze``), each completed run's final
checkpoint is first scored on those multiple-choice tasks under its recipe, zero-shot, on every
item (``RUN/eval.json``; a run already scored so on them at that checkpoint is not scored
again: :func:`_scored_already`), and the report and the summary table show the scores. With
``margin`` (``--margin PCT``, with seeds), ``comparison.json`` also holds each recipe's
equivalence to bf16 within +-PCT % (:mod:`mxfp8.report.equivalence`), and so does the report.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxfp8.checkpoint.resume import config_changes, describe_changes, step_of
from mxfp8.config.fields import ConfigError
from mxfp8.config.train_config import TrainConfig, load_config
from mxfp8.fileio import write_text_atomically
from mxfp8.report.comparison_stats import stats_json
from mxfp8.report.equivalence import check_margin
from mxfp8.report.eval_entries import (
    COMPARE_NUM_FEWSHOT,
    checkpoint_names,
    is_full_task_result,
    of_checkpoint,
)
from mxfp8.report.html import write_report
from mxfp8.report.loader import (
    COMPARISON_INDEX,
    EVAL_FILE,
    SEED_DIR,
    is_run_dir,
    load_runs,
    seed_dir_name,
    seed_runs,
)
from mxfp8.train.loop import RUN_FILES

DEFAULT_RECIPES = ("bf16", "mxfp8")
# named sets for `--recipes`: the default pair; the paper's ablations (its failing floor rule
# and the Hopper-era E5M2 gradients) with the per-tensor FP8 baseline; everything that changes
# how much is quantized; every preset
RECIPE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_RECIPES,
    "ablations": ("bf16", "mxfp8", "mxfp8-floor", "mxfp8-e5m2-grads", "fp8-tensorwise"),
    "coverage": (
        "bf16",
        "mxfp8",
        "mxfp8-wgrad-hp",
        "mxfp8-2d-weight",
        "mxfp8-attn",
        "mxfp8-adaptive",
        "fp8-rowwise",
    ),  # fmt: skip
}
DEFAULT_TELEMETRY_EVERY = 100  # overhead measured at 2-4.5 % of training time (performance.md)
MIN_TELEMETRY_POINTS = 4  # short runs sample more often, so the heatmaps have columns
DEFAULT_CKPT_EVERY = 100  # so that an interrupted comparison loses at most this many steps


class CompareError(RuntimeError):
    """A comparison that cannot proceed (e.g. a run directory of another config)."""


def default_telemetry_every(steps: int) -> int:
    """Every 100 steps, or often enough to give at least 4 telemetry steps in a short run."""
    return max(1, min(DEFAULT_TELEMETRY_EVERY, steps // MIN_TELEMETRY_POINTS))


@dataclass
class RunPlan:
    recipe: str
    cfg: TrainConfig
    state: str  # "done", "resume", "fresh"
    seed: int | None = None  # set by --seeds: the run is OUT/<recipe>/seed<k>/

    @property
    def label(self) -> str:
        """``recipe``, or ``recipe/seed<k>``: the run's directory relative to OUT."""
        return self.recipe if self.seed is None else f"{self.recipe}/{seed_dir_name(self.seed)}"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.out)


@dataclass
class CompareResult:
    out: Path
    report: Path | None
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    stopped_by: str | None = None  # the signal that stopped the comparison early
    exit_code: int = 0  # 128 + that signal


def _state(run_dir: Path, cfg: TrainConfig) -> str:
    from mxfp8.checkpoint.write import latest_intact_checkpoint

    saved = run_dir / "config.toml"
    if saved.is_file():
        changes = config_changes(load_config(saved), cfg)  # the rule --resume applies
        if changes:
            raise CompareError(
                f"{run_dir} holds a run with a different config ({describe_changes(changes)}); "
                "use another --out or remove it"
            )
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("steps") == cfg.run.steps:
            return "done"
    if latest_intact_checkpoint(run_dir)[0] is not None:
        return "resume"
    return "fresh"


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds of a multi-seed comparison: at least one, non-negative integers, each once."""
    seeds = list(seeds)
    if not seeds:
        raise CompareError("no seed given: --seeds takes integers, e.g. --seeds 0,1,2")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise CompareError(f"seeds must be non-negative integers, got {bad}")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"a seed is listed twice: {seeds}")
    return seeds


def _check_layout(recipe_dir: Path, seeded: bool) -> None:
    """A recipe directory holds one single-seed run or seed directories, never both."""
    if seeded and is_run_dir(recipe_dir):
        raise CompareError(
            f"{recipe_dir} holds a single-seed run (no --seeds); run that comparison without "
            "--seeds, or use another --out for the multi-seed one"
        )
    if not seeded and seed_runs(recipe_dir):
        raise CompareError(
            f"{recipe_dir} holds the seed<k>/ runs of a multi-seed comparison; run it with "
            "--seeds, or use another --out"
        )


def plan(base: TrainConfig, recipes: Sequence[str], out: Path,
         seeds: Sequence[int] | None = None) -> list[RunPlan]:  # fmt: skip
    """One config per recipe (only ``recipe.name`` and ``run.out`` differ), with its state;
    with ``seeds``, one per (seed, recipe), seed after seed, ``run.seed`` differing too."""
    if len(set(recipes)) != len(recipes):
        raise CompareError(f"a recipe is listed twice: {list(recipes)}")
    if seeds is not None:
        seeds = check_seeds(seeds)
    for name in recipes:
        _check_layout(out / name, seeds is not None)
    plans = []
    for seed in seeds if seeds is not None else [None]:
        for name in recipes:
            run_dir = out / name if seed is None else out / name / seed_dir_name(seed)
            try:  # recipe field overrides given on the command line apply to every recipe
                recipe_section = dataclasses.replace(base.recipe, name=name)
            except ConfigError as exc:
                raise CompareError(f"recipe {name}: {exc}") from None
            run = dataclasses.replace(base.run, out=str(run_dir), resume=False)
            if seed is not None:
                run = dataclasses.replace(run, seed=seed)
            cfg = base.replace(recipe=recipe_section, run=run)
            state = _state(run_dir, cfg)
            if state == "resume":
                cfg = cfg.replace(run=dataclasses.replace(cfg.run, resume=True))
            plans.append(RunPlan(name, cfg, state, seed))
    return plans


def with_compare_defaults(base: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Telemetry on and periodic checkpoints, unless the user set those fields."""
    run = base.run
    changes: dict[str, Any] = {}
    if "run.telemetry_every" not in explicit:
        changes["telemetry_every"] = default_telemetry_every(run.steps)
    if "run.ckpt_every" not in explicit and run.ckpt_every == 0:
        changes["ckpt_every"] = min(DEFAULT_CKPT_EVERY, run.steps)
    return base.replace(run=dataclasses.replace(run, **changes)) if changes else base


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _write_index(out: Path, recipes: Sequence[str], seeds: Sequence[int] | None,
                 margin: float | None = None, with_stats: bool = False) -> None:  # fmt: skip
    """``out/comparison.json``: the recipe order; with seeds, the seeds, the equivalence
    margin if any (which the report reads) and (at the end) the statistics over them of the
    runs complete by then."""
    index: dict[str, Any] = {"recipes": list(recipes)}
    if seeds is not None:
        index["seeds"] = list(seeds)
        if margin is not None:
            index["margin"] = margin
        if with_stats:
            try:
                index["stats"] = stats_json(load_runs(out), margin)
            except FileNotFoundError:  # no run wrote anything yet
                pass
    write_text_atomically(out / COMPARISON_INDEX, json.dumps(index, indent=2) + "\n")


def _index_is(out: Path, recipes: Sequence[str], seeds: Sequence[int] | None,
              margin: float | None = None) -> bool:  # fmt: skip
    """Whether ``out/comparison.json`` already names these recipes, seeds and margin."""
    try:
        index = json.loads((out / COMPARISON_INDEX).read_text())
    except (OSError, ValueError):
        return False
    wanted = None if seeds is None else list(seeds)
    return (index.get("recipes") == list(recipes) and index.get("seeds") == wanted
            and index.get("margin") == (None if seeds is None else margin))  # fmt: skip


def compare(base: TrainConfig, recipes: Sequence[str], out: str | Path, eval_tasks: str = "",
            seeds: Sequence[int] | None = None,
            margin: float | None = None) -> CompareResult:  # fmt: skip
    """Run (or resume, or skip) each recipe (under each of ``seeds``), score ``eval_tasks``,
    write ``out/report.html`` (and, with seeds, the statistics into ``out/comparison.json``,
    with ``margin`` the equivalence to bf16 within +-``margin`` % too)."""
    from mxfp8.train.loop import RunComplete, train

    out = Path(out)
    if margin is not None:
        if seeds is None:
            raise CompareError("an equivalence margin needs seeds (--seeds K,K,...)")
        try:
            margin = check_margin(margin)
        except ValueError as exc:
            raise CompareError(str(exc)) from None
    plans = plan(base, recipes, out, seeds)
    out.mkdir(parents=True, exist_ok=True)
    same_index = _index_is(out, recipes, seeds, margin)  # else the report must change with it
    _write_index(out, recipes, seeds, margin)
    result = CompareResult(out=out, report=None)
    for i, p in enumerate(plans, start=1):
        run_dir = p.run_dir
        head = f"[{i}/{len(plans)}] {p.label}"
        if p.state == "done":
            _say(f"{head}: already complete in {run_dir}, skipped")
            result.done.append(p.label)
            continue
        if p.state == "fresh":
            for name in RUN_FILES:  # leftovers of a run killed before its first checkpoint
                (run_dir / name).unlink(missing_ok=True)
        verb = "resuming" if p.state == "resume" else "training"
        _say(f"{head}: {verb} ({p.cfg.run.steps} steps) in {run_dir}")
        try:
            r = train(p.cfg)
        except RunComplete:  # its final checkpoint was there, summary.json now is too
            result.done.append(p.label)
            continue
        except Exception as exc:  # one failed recipe must not lose the others
            traceback.print_exc()
            result.failed[p.label] = f"{type(exc).__name__}: {exc}"
            continue
        if r.completed:
            result.done.append(p.label)
        else:
            result.incomplete.append(p.label)
        if r.stopped_by:  # SIGTERM / Ctrl-C stops the whole comparison, not just this run
            result.stopped_by, result.exit_code = r.stopped_by, r.exit_code
            break
    if eval_tasks and not result.stopped_by:
        for label in result.done:
            try:
                evaluate_run(out / label, eval_tasks)
            except Exception as exc:  # a failed evaluation must not lose the report
                traceback.print_exc()
                result.failed[f"{label} (eval)"] = f"{type(exc).__name__}: {exc}"
    if seeds is not None:  # what the runs complete by now say, also when stopped early
        _write_index(out, recipes, seeds, margin, with_stats=True)
    report = out / "report.html"
    up_to_date = same_index and _newer_than_runs(report, [p.run_dir for p in plans])
    if len(result.done) == len(plans) and up_to_date:
        result.report = report  # every run was skipped: the report is already up to date
        return result
    try:
        result.report = write_report(out)
    except FileNotFoundError:
        result.report = None  # nothing was written (every run failed before logging)
    return result


def evaluate_run(run_dir: Path, specs: str) -> None:
    """Score a run's final checkpoint on the tasks ``specs`` under its own recipe, zero-shot
    and on every item, into ``run_dir/eval.json``, unless it holds those scores already."""
    from mxfp8.interop import tasks as mc
    from mxfp8.interop.evaluate import append_evaluation
    from mxfp8.interop.source import eval_split, open_model

    path = run_dir / EVAL_FILE
    known = json.loads(path.read_text()).get("evaluations", []) if path.is_file() else []
    if _scored_already(run_dir, specs, known):  # without loading the model
        return
    loaded = open_model(run_dir)
    tokens, what = eval_split(loaded)
    name = run_dir.name  # a seed's run: <recipe>/seed<k>
    if SEED_DIR.fullmatch(name):
        name = f"{run_dir.parent.name}/{name}"
    _say(f"evaluating {name} on {', '.join(sorted(mc.task_names(specs)))}")
    scores = mc.evaluate_tasks(loaded.model, loaded.tokenizer, specs, tokens,
                               num_fewshot=COMPARE_NUM_FEWSHOT,
                               recipe=loaded.run_recipe)  # fmt: skip
    append_evaluation(path, {"source": loaded.source, **loaded.recipe_record(), "data": what,
                             "tasks": scores})  # fmt: skip


def _scored_already(run_dir: Path, specs: str, known: Sequence[dict[str, Any]]) -> bool:
    """Whether ``known`` (``eval.json``'s evaluations) holds, for every task of ``specs``, a
    result that :func:`evaluate_run` would give again: of the run's latest intact checkpoint
    (its source names that checkpoint and step), under the recipe of its config, on the run's
    validation split, zero-shot (:data:`COMPARE_NUM_FEWSHOT`) and over every item of the task
    (no ``--limit`` cut it short). Each task may come from another entry. The model is never
    loaded: the tasks are built from the split to count their items (only when some entry
    names the checkpoint)."""
    from mxfp8.checkpoint.find import find_checkpoint
    from mxfp8.checkpoint.manifest import CONFIG_FILE
    from mxfp8.data.prepare import prepare_data
    from mxfp8.interop import tasks as mc
    from mxfp8.interop.source import run_split

    if not known:
        return False
    ck = find_checkpoint(run_dir, None)
    step = step_of(ck)  # find_checkpoint verified it: its manifest holds the same step
    cfg = load_config(ck / CONFIG_FILE)
    names = checkpoint_names(ck, step)
    if not any(e.get("source") in names and e.get("recipe") == cfg.recipe.name for e in known):
        return False  # not even the checkpoint: no need to read the split
    tokens, what = run_split(cfg)
    found = of_checkpoint(known, recipe=cfg.recipe.name, data=what, checkpoint=ck, step=step)
    if not found:
        return False
    tasks = mc.resolve(specs, prepare_data(cfg.data).tokenizer, tokens)
    return all(any(is_full_task_result((e.get("tasks") or {}).get(t.name), len(t.items))
                   for e in found) for t in tasks)  # fmt: skip


def _newer_than_runs(report: Path, run_dirs: Sequence[Path]) -> bool:
    if not report.is_file():
        return False
    made = report.stat().st_mtime
    names = (*RUN_FILES, "config.toml", EVAL_FILE)  # new scores also need a new report
    files = [d / name for d in run_dirs for name in names]
    return all(f.stat().st_mtime <= made for f in files if f.is_file())
