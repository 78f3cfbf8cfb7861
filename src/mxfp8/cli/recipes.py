"""``mxfp8 recipes``: list the named recipes and their settings.

Without arguments: one line per preset (name, scaling, formats of the three GEMMs, rule,
whether loss scaling is needed, description). ``mxfp8 recipes NAME`` prints that recipe as
TOML (what a run config embeds); ``--json`` prints every preset's fields for machines.
"""

from __future__ import annotations

import argparse
import json

from mxfp8.errors import UserError
from mxfp8.layers.recipe import Recipe, ScalingKind, list_recipes, recipe


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "recipes",
        help="list the named recipes and their settings",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("name", nargs="?", help="print this recipe in full, as TOML")
    p.add_argument("--json", action="store_true", help="all presets and their fields, as JSON")
    return p


def _formats(r: Recipe) -> str:
    if r.scaling is ScalingKind.NONE:
        return "-"
    short = {"e4m3": "E4", "e5m2": "E5"}
    return " ".join(
        f"{g}:hp"
        if g in r.hp_gemms
        else f"{g}:{short[getattr(r, f'{g}_{a}').value]}/{short[getattr(r, f'{g}_{b}').value]}"
        for g, (a, b) in (
            ("fprop", ("input", "weight")),
            ("dgrad", ("grad_output", "weight")),
            ("wgrad", ("grad_output", "input")),
        )
    )


def _scaling(r: Recipe) -> str:
    if r.scaling is ScalingKind.MX:
        tiles = " W:32x32" if r.weight_block.value == "32x32" else ""
        return f"mx/{r.block_size} {r.scale_rule.value}{tiles}"
    if r.scaling is ScalingKind.NONE:
        return f"none ({r.compute_dtype.value})"
    if r.scaling is ScalingKind.DELAYED:
        return f"delayed {r.amax_reduce.value}/{r.history_len}"
    return r.scaling.value


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({n: recipe(n).to_dict() for n in list_recipes()}, indent=2))
        return 0
    if args.name:
        if args.name not in list_recipes():
            raise UserError(f"unknown recipe {args.name!r}; presets: {', '.join(list_recipes())}")
        print(recipe(args.name).to_toml(), end="")
        return 0
    rows = [("name", "scaling", "formats (a/b per GEMM)", "loss scaling", "description")]
    for n in list_recipes():
        r = recipe(n)
        rows.append(
            (n, _scaling(r), _formats(r), "yes" if r.dynamic_loss_scaling else "no", r.description)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0
