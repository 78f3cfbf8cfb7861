"""Entry point of the ``mxfp8`` command, and its one error policy.

Each subcommand lives in its own module of this package and exposes two functions:
``add_parser(subparsers)`` (declares the subcommand and its options) and ``run(args) -> int``;
optionally ``unknown_option_message(word) -> str``, to explain a word no option matched (the
config-driven commands list the valid ``--section.field`` keys). Modules are imported only for
the subcommand being run, so ``mxfp8 --help`` is fast.

Errors are handled here, once, so that every subcommand behaves the same:

- bad input (an exception of :data:`mxfp8.errors.USER_ERRORS`, e.g. a ``ConfigError``, a
  missing file, a corpus too small to train on) prints one line, ``mxfp8 COMMAND: error:
  MESSAGE``, and exits with status 2; so does a command-line syntax error;
- ``--debug`` (before or after the subcommand, or ``MXFP8_DEBUG=1``) prints the traceback of
  such an error too, for a bug report or to see where a message came from;
- any other exception is a bug: it propagates with its traceback (status 1);
- Ctrl-C exits with status 130 and no traceback (the training loop stops gracefully on its
  own first; this is the fallback for the rest of the program).

Subcommands may still catch errors themselves and return 2; raising is preferred, since only
an exception that reaches :func:`main` can show its traceback under ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import NoReturn

from mxfp8.errors import is_user_error, user_message

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mxfp8.cli.train", "pre-train a model under a recipe (the main job)"),
    "compare": ("mxfp8.cli.compare", "train the same model under several recipes, side by side"),
    "report": ("mxfp8.cli.report", "write the HTML report of a run or comparison directory"),
    "quantize-stats": (
        "mxfp8.cli.quantize_stats",
        "MX quantization statistics of each tensor in a checkpoint file",
    ),
    "consolidate": (
        "mxfp8.cli.consolidate",
        "write the weights of a (sharded) checkpoint as one model.safetensors",
    ),
    "export": (
        "mxfp8.cli.export",
        "write a checkpoint as a Hugging Face Llama directory (bf16/fp32 or MXFP8 weights)",
    ),
    "eval": ("mxfp8.cli.eval", "validation loss, perplexity and bits per byte of a model"),
    "generate": ("mxfp8.cli.generate", "continue a prompt with a trained model"),
    "recipes": ("mxfp8.cli.recipes", "list the named recipes and their settings"),
    "demo": ("mxfp8.cli.demo", "the `make demo` job"),
}

DEBUG_FLAG = "--debug"
EXIT_USAGE = 2
"""Status of a usage or input error (argparse's own convention)."""
EXIT_INTERRUPTED = 130
"""Status after Ctrl-C: 128 + SIGINT, what shells report for a process killed by it."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose syntax errors are one line, like every other input error.

    argparse prints the whole usage before its error, which for ``mxfp8 train`` is a screenful
    that hides the one line that matters; ``--help`` is named instead. Subparsers inherit this
    class (``add_subparsers`` uses the class of its parent).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(
    command: str | None = None,
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The root parser, and the full parser of ``command`` (None when no command is given)."""
    parser = Parser(
        prog="mxfp8",
        description="Pre-training LLMs with MXFP8: numerics, recipes, training and reports.",
    )
    from mxfp8 import __version__

    parser.add_argument("--version", action="version", version=f"mxfp8 {__version__}")
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="show the full traceback of an error (also accepted after the command, or set "
        "MXFP8_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    for name, (module, help_text) in COMMANDS.items():
        if command == name:
            chosen = importlib.import_module(module).add_parser(sub)
        else:  # placeholder so `mxfp8 --help` lists every command without importing it
            sub.add_parser(name, help=help_text, add_help=False)
    return parser, chosen


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {_rank_prefix()}{message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is taken out wherever it stands, so that `mxfp8 train ... --debug` works too
    debug = DEBUG_FLAG in argv or os.environ.get("MXFP8_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, _ = build_parser(command if command in COMMANDS else None)
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as e:  # --help and --version exit 0, as usual; a syntax error returns 2
        if e.code == EXIT_USAGE:  # the one-line message is printed already
            return EXIT_USAGE
        raise
    if args.command is None:
        if extras:
            return _fail("mxfp8", f"unrecognized arguments: {' '.join(extras)}")
        parser.print_help()
        return 0
    prog = f"mxfp8 {args.command}"
    module = importlib.import_module(COMMANDS[args.command][0])
    if extras:
        explain = getattr(module, "unknown_option_message", None)
        bad = next((w for w in extras if w.startswith("-")), extras[0])
        why = explain(bad) if explain else f"unrecognized arguments: {' '.join(extras)}"
        return _fail(prog, why)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `mxfp8 recipes --json | head`: the reader left, nothing to say
        _silence_stdout()
        return 1
    except Exception as exc:
        if not is_user_error(exc):
            raise  # a bug: Python prints the traceback and exits with status 1
        if debug:
            traceback.print_exc()
        return _fail(prog, user_message(exc))
    finally:
        _leave_process_group()


def _rank_prefix() -> str:
    """``[rank R] `` in a job of several processes (torchrun), so that the failing rank is
    named; empty otherwise."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '?')}] " if world not in ("", "0", "1") else ""


def _leave_process_group() -> None:
    """Destroy the torch.distributed process group a command created (torchrun jobs)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit raises no second BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured by a test)
        pass


if __name__ == "__main__":
    raise SystemExit(main())
