"""``mxfp8 report DIR``: write DIR/report.html for a run or a comparison directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="write the HTML report of a run or comparison directory",
        description=(
            "Write a self-contained HTML report (figures embedded) of a run directory, or of a "
            "comparison directory holding one run directory per recipe, plus the figures as "
            "PNG files under plots/. Prints the path of the report."
        ),
    )
    p.add_argument("dir", type=Path, help="a run directory or a comparison directory")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the HTML file (default: DIR/report.html)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """A missing or empty directory raises FileNotFoundError: ``mxfp8.cli.main`` words it."""
    from mxfp8.report.html import write_report

    print(write_report(args.dir, args.output))
    return 0
