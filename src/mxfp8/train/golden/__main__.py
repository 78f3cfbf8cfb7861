"""``python -m mxfp8.train.golden [--recipes bf16,mxfp8] [--operands-only]``: regenerate the
golden curves (and mxfp8.json's exact weight-operand fingerprint); ``--operands-only``
rewrites only that fingerprint, keeping the recorded curves and environment."""

import argparse

from mxfp8.train.golden import FINGERPRINT_FILE, FINGERPRINT_KEY, RECIPES, regen

ap = argparse.ArgumentParser(description="regenerate the golden loss curves")
ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
ap.add_argument(
    "--operands-only",
    action="store_true",
    help=f"only rewrite the {FINGERPRINT_KEY} field of {FINGERPRINT_FILE}.json",
)
args = ap.parse_args()
regen(tuple(args.recipes.split(",")), operands_only=args.operands_only)
