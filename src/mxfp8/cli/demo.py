"""``mxfp8 demo`` (what ``make demo`` runs): the main job, i.e. ``mxfp8 train`` with defaults."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "demo",
        help="the `make demo` job",
        description="Run the main job: the tiny model under the mxfp8 recipe on Shakespeare "
        "(the same as `mxfp8 train` with no arguments).",
    )


def run(args: argparse.Namespace) -> int:
    from mxfp8.cli.train import run_config
    from mxfp8.train.config import TrainConfig

    return run_config(TrainConfig())
