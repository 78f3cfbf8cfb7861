"""`mxfp8 recipes`: the table, one recipe as TOML, --json, and an unknown name."""

from __future__ import annotations

import json

from mxfp8.cli.main import main
from mxfp8.layers.recipe import Recipe, list_recipes, recipe


def test_table_lists_every_preset(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["name", "scaling"]
    assert [line.split()[0] for line in out[1:]] == list_recipes()
    mx = next(line for line in out if line.startswith("mxfp8 "))
    assert "mx/32 rceil" in mx and "wgrad:E4/E4" in mx
    assert "yes" in next(line for line in out if line.startswith("fp8-delayed "))


def test_one_recipe_as_toml_round_trips(capsys):
    assert main(["recipes", "mxfp8-e5m2-grads"]) == 0
    assert Recipe.from_toml(capsys.readouterr().out) == recipe("mxfp8-e5m2-grads")


def test_json_and_unknown(capsys):
    assert main(["recipes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert Recipe.from_dict(data["fp8-delayed"]) == recipe("fp8-delayed")
    assert main(["recipes", "mxfp4"]) == 2
    assert "unknown recipe 'mxfp4'" in capsys.readouterr().err
