"""Per-layer precision: [[recipe.overrides]] by fqn pattern, keep_first_blocks and
keep_last_blocks; each layer runs its own recipe and the report says which."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from toy_model import Toy

from mxfp8.config.fields import ConfigError
from mxfp8.config.train_config import load_config
from mxfp8.layers.convert import convert_model, layer_recipes
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import Recipe, recipe
from mxfp8.train import golden
from mxfp8.train.loop import train


def _kinds(model):
    return {n: (m.recipe.name if isinstance(m, MXLinear) else "hp")
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}  # fmt: skip


def test_overrides_and_kept_blocks_choose_each_layers_recipe():
    r = recipe("mxfp8", keep_last_blocks=1, overrides=[
        {"pattern": "layers.0.attention.*", "recipe": "bf16"},
        {"pattern": "layers.1.*", "recipe": "mxfp8-floor"},
        {"pattern": "layers.*", "recipe": "fp8-tensorwise"},  # later: never reached for 0.attn
    ])  # fmt: skip
    model = convert_model(Toy(n_layers=4, hidden=64), r)
    kinds = _kinds(model)
    for i in range(4):
        for lin in ("wq", "wk", "wv", "wo"):
            want = {0: "hp", 1: "mxfp8-floor", 2: "fp8-tensorwise", 3: "hp"}[i]
            assert kinds[f"layers.{i}.attention.{lin}"] == want
        for lin in ("w1", "w2", "w3"):
            want = {0: "fp8-tensorwise", 1: "mxfp8-floor", 2: "fp8-tensorwise", 3: "hp"}[i]
            assert kinds[f"layers.{i}.feed_forward.{lin}"] == want
    assert kinds["output"] == "hp"  # keep_high_precision wins over every override
    assert model.layers[1].attention.wq.recipe.scale_rule == "floor"
    rep = model.mxfp8_report
    kept = rep.kept
    assert kept["layers.0.attention.wq"] == "override 'layers.0.attention.*' -> bf16"
    assert kept["layers.3.feed_forward.w2"] == "keep_last_blocks=1"
    text = str(rep)
    assert "mxfp8-floor" in text and "fp8-tensorwise" in text and "keep_last_blocks=1" in text
    assert rep.layer_recipes["layers.2.feed_forward.w1"] == "fp8-tensorwise"
    assert layer_recipes(model)["layers.3.attention.wq"] == "high precision"
    # a per-tensor override needs the loss scaler, so the run's recipe asks for it
    assert r.dynamic_loss_scaling and not recipe("mxfp8").dynamic_loss_scaling


def test_keep_first_blocks_and_a_bf16_base_with_quantized_overrides():
    model = convert_model(Toy(n_layers=3, hidden=64), recipe("mxfp8", keep_first_blocks=2))
    assert {n for n, k in _kinds(model).items() if k == "mxfp8"} == {
        f"layers.2.{p}"
        for p in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    }
    base = recipe("bf16", overrides=[{"pattern": "layers.1.feed_forward.*", "recipe": "mxfp8"}])
    assert base.quantizes_any and not base.quantized
    kinds = _kinds(convert_model(Toy(n_layers=2, hidden=64), base))
    assert {n for n, k in kinds.items() if k == "mxfp8"} == {
        "layers.1.feed_forward.w1",
        "layers.1.feed_forward.w2",
        "layers.1.feed_forward.w3",
    }


def test_a_kept_layer_is_exactly_nn_linear_and_a_converted_one_is_not():
    torch.manual_seed(0)
    ref = Toy(n_layers=2, hidden=64)
    model = Toy(n_layers=2, hidden=64)
    model.load_state_dict(ref.state_dict())
    convert_model(model, recipe("mxfp8", overrides=[{"pattern": "layers.0.*", "recipe": "bf16"}]))
    x = torch.randn(8, 64)
    assert torch.equal(model.layers[0].attention.wq(x), ref.layers[0].attention.wq(x))
    assert not torch.equal(model.layers[1].attention.wq(x), ref.layers[1].attention.wq(x))


def test_bad_overrides_are_refused_with_their_names():
    for bad, match in (
        ({"pattern": "layers.0.*", "recipe": "mxfp9"}, "unknown recipe 'mxfp9'"),
        ({"pattern": "layers.0.*", "recipe": "fp32"}, "changes the compute dtype"),
        ({"pattern": "layers.0.*"}, "needs exactly 'pattern' and 'recipe'"),
        ({"pattern": "", "recipe": "bf16"}, "non-empty fnmatch pattern"),
    ):
        with pytest.raises(ValueError, match=match):
            recipe("mxfp8", overrides=[bad])
    with pytest.raises(ValueError, match="keep_last_blocks must be an int >= 0"):
        recipe("mxfp8", keep_last_blocks=-1)


def test_a_run_config_with_overrides_trains_and_records_each_layers_recipe(tmp_path, data_cache):
    toml = tmp_path / "run.toml"
    toml.write_text('[recipe]\nname = "mxfp8"\nkeep_last_blocks = 1\n\n[[recipe.overrides]]\n'
                    'pattern = "layers.0.attention.*"\nrecipe = "fp8-rowwise"\n')  # fmt: skip
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "run.out": str(tmp_path / "r"),
            "run.steps": 2, "run.eval_every": 0}  # fmt: skip
    cfg = load_config(toml, over)
    result = train(cfg)
    assert result.completed
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    layers = summary["layer_recipes"]
    last = cfg.model.build().n_layers - 1
    assert layers["layers.0.attention.wq"] == "fp8-rowwise"
    assert layers["layers.0.feed_forward.w1"] == "mxfp8"
    assert layers[f"layers.{last}.feed_forward.w1"] == "high precision"
    from mxfp8.report.html import render_html
    from mxfp8.report.loader import load_runs

    page = render_html(load_runs(tmp_path / "r"), [], "t")
    assert "<h2>Layer recipes</h2>" in page and "fp8-rowwise" in page
    # the saved config reads back to the same recipe (resume depends on it)
    saved = load_config(tmp_path / "r" / "config.toml")
    assert saved.recipe.build() == cfg.recipe.build()
    assert isinstance(saved.recipe.build(), Recipe)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config(None, {"recipe.overrides": [{"pattern": "x", "recipe": "nope"}]})
