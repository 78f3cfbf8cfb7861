"""``python -m mxfp8.train.golden [--recipes bf16,mxfp8]``: regenerate the golden curves."""

import argparse

from mxfp8.train.golden import RECIPES, regen

ap = argparse.ArgumentParser(description="regenerate the golden loss curves")
ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
regen(tuple(ap.parse_args().recipes.split(",")))
