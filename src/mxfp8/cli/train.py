"""``mxfp8 train``: pre-train a model under a recipe (the main job when run with no arguments).

Every ``--section.field`` option is generated from the config dataclasses of
:mod:`mxfp8.config.train_config`, with their help text, so this file never lists options by hand.
:func:`add_config_options` declares them on any parser (``mxfp8 compare`` shares them), and
:func:`unknown_option_message` (called by ``mxfp8.cli.main`` for words no option matched) turns a
mistyped ``--section.field`` into an error that lists the valid keys of that section.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mxfp8.config.train_config import TrainConfig

# short flag -> (config key, metavar, help)
SHORT_FLAGS: dict[str, tuple[str, str, str]] = {
    "--recipe": ("recipe.name", "NAME", "recipe preset (see `mxfp8 recipes`) = --recipe.name"),
    "--model": ("model.preset", "PRESET", "model preset: tiny, 125m, 350m, 1b, 8b"),
    "--data": ("data.source", "SOURCE", "shakespeare, kjv, or .txt/.jsonl/.parquet paths"),
    "--steps": ("run.steps", "N", "planned optimizer steps (the lr schedule spans them)"),
    "--out": ("run.out", "DIR", "run directory (default: runs/<recipe>-<timestamp>)"),
    "--seed": ("run.seed", "SEED", "seed of the model init and the data order"),
    "--stop-after": ("run.stop_after", "K", "end this process after K steps, with a checkpoint"),
    "--memory": (
        "run.memory",
        "PROFILE",
        "memory profile: default, or lean (the memory savers "
        "of docs/performance.md) = --run.memory",
    ),
    "--init-from": (
        "run.init_from",
        "DIR",
        "start from a Llama directory (mxfp8 export or "
        "transformers'): its shape, tokenizer and weights",
    ),  # fmt: skip
}
_PREFIX = "set:"  # argparse dest of generated options: "set:section.field"

DESCRIPTION = """\
Pre-train a Llama-style model under a quantization recipe. With no arguments this is the main
job: the `tiny` model, the `mxfp8` recipe and the Shakespeare corpus (a few minutes on CPU).

Settings come from the defaults, then --config FILE (TOML, one table per section), then
--section.field VALUE options. The resolved config is saved as RUN/config.toml, and
`--resume --out RUN` continues a stopped run (bit-identical to an uninterrupted one).
`--resume auto` is one command for every launch of a job (a scheduler's requeue): it starts
the run when RUN holds none, continues it when RUN holds it, and refuses another run."""


def usage(command: str, extra: str = "") -> str:
    """The usage line of a subcommand that takes the run-config options (``extra`` first)."""
    items = [extra, "[--config FILE]", "[--recipe NAME]", "[--model PRESET]",
             "[--data SOURCE]", "[--steps N]", "[--out DIR]", "[--seed SEED]", "[--resume [auto]]",
             "[--stop-after K]", "[--memory lean]", "[--SECTION.FIELD VALUE ...]"]  # fmt: skip
    head = f"mxfp8 {command} "
    pad = " " * (len("usage: ") + len(head))
    lines, line = [], head
    for item in filter(None, items):
        if len(line) + len(item) > 88 and line.strip() != head.strip():
            lines.append(line.rstrip())
            line = pad
        line += item + " "
    return "\n".join([*lines, line.rstrip()])


def unknown_option_message(option: str) -> str:
    """Why ``option`` (an unrecognized command-line word) is wrong, and what is valid."""
    from mxfp8.config.fields import ConfigError
    from mxfp8.config.train_config import apply_overrides, config_keys

    if not option.startswith("--"):
        return f"unrecognized argument {option!r}"
    dotted = option[2:].split("=", 1)[0]
    if "." not in dotted:
        return f"unrecognized option --{dotted} (see --help)"
    section, _, field = dotted.partition(".")
    keys = config_keys()
    if section in keys:
        valid = [entry[0] for entry in keys[section]]
        close = difflib.get_close_matches(field, valid, n=1)
        hint = f" (did you mean --{section}.{close[0]}?)" if close else ""
        return f"unknown option --{dotted}{hint}; valid keys in [{section}]: " + ", ".join(valid)
    try:
        apply_overrides({}, {dotted: ""})
    except ConfigError as e:
        return f"unknown option --{dotted}: {e}"
    return f"unknown option {option}"


def _short_type(tp: Any) -> str:
    from mxfp8.config.fields import type_name

    name = type_name(tp).replace("NoneType", "none")
    name = name.replace("list of str (comma-separated)", "A,B,...")
    return name.replace("2 floats (comma-separated)", "X,Y")


def add_config_options(
    parser: argparse.ArgumentParser,
    *,
    out_help: str = SHORT_FLAGS["--out"][2],
    recipe_help: str = SHORT_FLAGS["--recipe"][2],
    resume_help: str = (
        "continue from the latest checkpoint in --out (its config.toml is the base); "
        "--resume auto: one command for every launch of a job: start the run when --out holds "
        "none (or only a start-up crash's leftovers), continue it when --out holds it (the "
        "command names the whole run), refuse a directory of another run"
    ),
) -> None:
    """Declare ``--config``, ``--resume``, the short flags and every ``--section.field``.

    Values stay strings here (dest ``set:section.field``, absent unless given); they are typed
    and validated when the config is built, so errors name the key. ``--out`` and ``--recipe``
    mean something else in ``mxfp8 compare``, hence their help texts are parameters.
    """
    from mxfp8.config.train_config import config_keys

    helps = {"--out": out_help, "--recipe": recipe_help}
    parser.add_argument("--config", metavar="FILE", help="TOML config file (sections as below)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_value,
                        metavar="auto", help=resume_help)  # fmt: skip
    for flag, (key, metavar, help_text) in SHORT_FLAGS.items():
        parser.add_argument(
            flag,
            dest=_PREFIX + key,
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=helps.get(flag, help_text),
        )
    for section, entries in config_keys().items():
        group = parser.add_argument_group(f"[{section}] options")
        for name, tp, default, help_text in entries:
            shown = getattr(default, "value", default)
            text = help_text if "(default:" in help_text else f"{help_text} (default: {shown!r})"
            group.add_argument(
                f"--{section}.{name}",
                dest=f"{_PREFIX}{section}.{name}",
                metavar=_short_type(tp),
                default=argparse.SUPPRESS,
                help=text.replace("%", "%%"),
            )


def _resume_value(text: str) -> str:
    if text.lower() == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(
        f"expected nothing (continue the run in --out) or 'auto' (start it, or continue it, "
        f"or refuse another run), got {text!r}"
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        allow_abbrev=False,
        help="pre-train a model under a recipe (the main job)",
        description=DESCRIPTION,
        usage=usage("train"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(p)
    p.add_argument(
        "--no-report", action="store_true", help="do not write RUN/report.html at the end"
    )
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``{"section.field": value}`` from parsed options; presets first so fields apply on top."""
    found = {k[len(_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(_PREFIX)}
    heads = {k: v for k, v in found.items() if k in ("model.preset", "recipe.name")}
    return {**heads, **{k: v for k, v in found.items() if k not in heads}}


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The run config of a command line (a resumed run starts from its saved config)."""
    from mxfp8.config.fields import ConfigError
    from mxfp8.config.train_config import load_config

    overrides = overrides_from_args(args)
    base = args.config
    if args.resume == "auto":  # the command line names the whole run, as at its first launch
        overrides["run.resume"] = "auto"
    elif args.resume:
        out = overrides.get("run.out")
        if not out:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = Path(out) / "config.toml"
        if base is None and saved.is_file():
            base = saved
            overrides.setdefault("run.stop_after", 0)  # the earlier job's limit is not ours
        overrides["run.resume"] = True
    cfg = load_config(base, overrides)
    if cfg.run.resume == "auto" and not cfg.run.out:
        raise ConfigError("--resume auto needs --out RUN_DIR (the run to start or continue)")
    return cfg


def run_config(cfg: TrainConfig, *, report: bool = True) -> int:
    """Train ``cfg``, print the outcome and the run path; returns the process exit code.

    0: the run completed, or it was already complete (a resume changes nothing then).
    128 + signal (143 for SIGTERM, 130 for SIGINT): stopped by a signal after a checkpoint.
    1: stopped after too many non-finite steps, or a checkpoint could not be written or read.
    Config and resume errors propagate (mxfp8.cli.main: exit 2).
    """
    from mxfp8.checkpoint.manifest import CheckpointError
    from mxfp8.parallel import DistEnv
    from mxfp8.train.loop import NonFiniteError, RunComplete, train
    from mxfp8.train.preempt import Aborted

    if not DistEnv.from_environ().is_main:  # rank 0 reports for the job; errors say their rank
        print_ = _quiet_print
    else:
        print_ = print
    try:
        result = train(cfg)
    except Aborted as e:  # a second SIGTERM/SIGINT: no checkpoint of this step
        print(f"mxfp8 train: {e}; the last checkpoint is intact: continue with "
              f"mxfp8 train --resume --out {cfg.run.out or 'RUN'}", file=sys.stderr)  # fmt: skip
        return 128 + e.signum
    except RunComplete as done:
        print_(f"mxfp8 train: {done}")
        print_(f"run directory: {done.run_dir}")
        return 0
    except (NonFiniteError, CheckpointError) as e:  # e.g. the disk filled up: not a usage error
        print(f"mxfp8 train: error: {e}", file=sys.stderr)
        return 1
    if result.completed:
        print_(f"final validation loss: {result.final_val_loss:.4f}")
        print_(f"final validation perplexity: {result.final_val_ppl:.2f}")
        summary = result.summary
        print_(f"throughput: {summary['tokens_per_s']:,.0f} tokens/s steady state (first "
              f"{summary['warmup_steps_excluded']} steps of each process left out: "
              f"compilation); wall time {summary['wall_time_s']:.1f} s")  # fmt: skip
        if report and print_ is print:
            _write_report(result.run_dir)
    else:
        why = f"stopped by {result.stopped_by}" if result.stopped_by else "stopped"
        print_(f"{why} after step {result.step} of {cfg.run.steps} (checkpoint written); "
              f"continue with: mxfp8 train --resume --out {result.run_dir}")  # fmt: skip
    print_(f"run directory: {result.run_dir}")
    return result.exit_code


def _quiet_print(*args, **kwargs) -> None:
    del args, kwargs


def _write_report(run_dir: Path) -> None:
    """The HTML report of the finished run; a failure here never fails the training job."""
    try:
        from mxfp8.report.html import write_report

        print(f"report: {write_report(run_dir)}")
    except Exception as e:  # noqa: BLE001 - the run itself succeeded and is on disk
        print(f"mxfp8 train: warning: no report written ({type(e).__name__}: {e})", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    # config and resume errors (ConfigError), missing files...: mxfp8.cli.main reports them
    return run_config(build_config(args), report=not args.no_report)
