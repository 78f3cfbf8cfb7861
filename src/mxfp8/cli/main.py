"""Entry point of the ``mxfp8`` command.

Each subcommand lives in its own module of this package and exposes two functions:
``add_parser(subparsers)`` (declares the subcommand and its options) and ``run(args) -> int``;
optionally ``unknown_option_message(word) -> str``, to explain a word no option matched (the
config-driven commands list the valid ``--section.field`` keys). Modules are imported only for
the subcommand being run, so ``mxfp8 --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mxfp8.cli.train", "pre-train a model under a recipe (the main job)"),
    "compare": ("mxfp8.cli.compare", "train the same model under several recipes, side by side"),
    "report": ("mxfp8.cli.report", "write the HTML report of a run or comparison directory"),
    "quantize-stats": (
        "mxfp8.cli.quantize_stats",
        "MX quantization statistics of each tensor in a checkpoint file",
    ),
    "recipes": ("mxfp8.cli.recipes", "list the named recipes and their settings"),
    "demo": ("mxfp8.cli.demo", "the `make demo` job"),
}


def build_parser(
    command: str | None = None,
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The root parser, and the full parser of ``command`` (None when no command is given)."""
    parser = argparse.ArgumentParser(
        prog="mxfp8",
        description="Pre-training LLMs with MXFP8: numerics, recipes, training and reports.",
    )
    from mxfp8 import __version__

    parser.add_argument("--version", action="version", version=f"mxfp8 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    for name, (module, help_text) in COMMANDS.items():
        if command == name:
            chosen = importlib.import_module(module).add_parser(sub)
        else:  # placeholder so `mxfp8 --help` lists every command without importing it
            sub.add_parser(name, help=help_text, add_help=False)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, sub = build_parser(command if command in COMMANDS else None)
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    if extras:
        explain = getattr(module, "unknown_option_message", None)
        bad = next((w for w in extras if w.startswith("-")), extras[0])
        assert sub is not None
        sub.error(explain(bad) if explain else f"unrecognized arguments: {' '.join(extras)}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
