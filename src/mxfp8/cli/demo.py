"""``mxfp8 demo`` (what ``make demo`` runs): the default recipe comparison, start to report.

It is ``mxfp8 compare`` with no options (bf16 against mxfp8, the ``tiny`` model, the built-in
Shakespeare corpus), written into a fresh ``runs/demo-<timestamp>`` directory so that a second
demo never skips or resumes the first one's runs. It prints the comparison table (final
validation loss, perplexity, gap to bf16) and the path of the HTML report. The defaults of
the run config are sized so that this finishes within 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="the `make demo` job",
        description="Compare bf16 with mxfp8 on the tiny model and the Shakespeare corpus "
        "(`mxfp8 compare` with its defaults) in a fresh directory, then print the table of "
        "final validation losses and the path of the HTML report.",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=None,
        help="comparison directory (default: runs/demo-<timestamp>)",
    )
    return p


def demo_dir() -> Path:
    """A fresh comparison directory: ``runs/demo-<timestamp>`` (``-2``, ``-3``... if taken)."""
    base = Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run_demo(out: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> int:
    """The demo: :data:`mxfp8.compare.DEFAULT_RECIPES` under the default run config.

    ``overrides`` (``{"section.field": value}``, as on the command line) shrink it for tests.
    Returns the exit status of :func:`mxfp8.cli.compare.compare_and_print`; a comparison that
    cannot start raises (``mxfp8.cli.main`` words the error).
    """
    from mxfp8.cli.compare import compare_and_print
    from mxfp8.compare import DEFAULT_RECIPES, with_compare_defaults
    from mxfp8.config.train_config import load_config

    overrides = dict(overrides or {})
    base = with_compare_defaults(load_config(None, overrides), set(overrides))
    out = Path(out) if out is not None else demo_dir()
    print(f"mxfp8 demo: {' vs '.join(DEFAULT_RECIPES)}, model {base.model.preset}, "
          f"data {base.data.source}, {base.run.steps} steps each, in {out}")  # fmt: skip
    return compare_and_print(base, DEFAULT_RECIPES, out)


def run(args: argparse.Namespace) -> int:
    return run_demo(args.out)
