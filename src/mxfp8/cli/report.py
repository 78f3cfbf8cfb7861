"""``mxfp8 report DIR``: write DIR/report.html for a run or a comparison directory."""

from __future__ import annotations

import argparse
import sys
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
    from mxfp8.report.html import write_report

    try:
        path = write_report(args.dir, args.output)
    except FileNotFoundError as exc:
        print(f"mxfp8 report: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
