"""convert_model on a Llama-shaped toy: which modules convert, the report, checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from toy_model import Toy

from mxfp8.layers.convert import ConversionReport, convert_model, mx_layers
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe


def test_default_converts_only_block_linears():
    model = Toy()
    keys = list(model.state_dict())
    out = convert_model(model, recipe("mxfp8"))
    assert out is model
    report: ConversionReport = model.mxfp8_report
    assert report.converted == [
        f"layers.{i}.{m}"
        for i in range(2)
        for m in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    ]
    assert report.kept == {"output": "matches keep_high_precision pattern 'output'"}
    assert type(model.output) is nn.Linear and isinstance(model.tok_embeddings, nn.Embedding)
    assert set(mx_layers(model)) == set(report.converted)
    assert all(m.name == n for n, m in mx_layers(model).items())
    assert list(model.state_dict()) == keys  # checkpoints move between bf16 and MXFP8 runs
    text = str(report)
    assert "14 linear layers converted, 1 kept" in text and "layers.1.feed_forward.w3" in text


def test_dims_not_divisible_by_block_are_kept_with_reason():
    model = Toy(d=64, hidden=80)  # 80 is not a multiple of 32
    convert_model(model, recipe("mxfp8"))
    kept = model.mxfp8_report.kept
    assert kept["layers.0.feed_forward.w1"] == "out_features=80 is not a multiple of block_size 32"
    assert kept["layers.0.feed_forward.w2"] == "in_features=80 is not a multiple of block_size 32"
    assert "layers.0.attention.wq" in model.mxfp8_report.converted
    for i in range(2):  # kept as plain nn.Linear (MXLinear itself would refuse these dims)
        for m in ("w1", "w2", "w3"):
            assert type(getattr(model.layers[i].feed_forward, m)) is nn.Linear
        assert f"layers.{i}.feed_forward.w3" in kept
    text = str(model.mxfp8_report)
    assert "keep    layers.0.feed_forward.w1" in text and "not a multiple of block_size" in text
    x = torch.randn(3, 64)
    ff = model.layers[0].feed_forward
    ff.w2(ff.w1(x)).sum().backward()  # the mixed model runs
    with pytest.raises(ValueError, match="'layers.0.feed_forward.w1'.*out_features=80"):
        MXLinear.from_linear(ff.w1, recipe("mxfp8"), name="layers.0.feed_forward.w1")
    tw = Toy(d=64, hidden=80)
    convert_model(tw, recipe("fp8-tensorwise"))  # no block constraint
    assert isinstance(tw.layers[0].feed_forward.w1, MXLinear)


def test_patterns_and_bf16_recipe():
    model = Toy()
    convert_model(model, recipe("mxfp8", keep_high_precision=["*.wo", "output"]))
    assert "layers.0.attention.wo" in model.mxfp8_report.kept
    model = Toy()
    convert_model(model, recipe("bf16"))
    assert model.mxfp8_report.converted == [] and not mx_layers(model)
    model = Toy()
    convert_model(model, recipe("mxfp8", convert=["*"], keep_high_precision=[]))
    assert "output" not in model.mxfp8_report.converted  # vocab 100: not a block multiple
    assert isinstance(model.layers[0].attention.wq, MXLinear)


def test_reconvert_back_to_high_precision_and_logging(caplog):
    model = Toy()
    convert_model(model, recipe("mxfp8"))
    w = model.layers[0].attention.wq.weight
    with caplog.at_level(logging.INFO, logger="mxfp8.layers.convert"):
        convert_model(model, recipe("bf16"))
    assert type(model.layers[0].attention.wq) is nn.Linear
    assert model.layers[0].attention.wq.weight is w  # shared, never copied
    assert "0 linear layers converted" in caplog.text


def test_converted_model_trains_and_matches_fqn_forward():
    torch.manual_seed(0)
    model = Toy()
    convert_model(model, recipe("mxfp8"))
    x = torch.randn(4, 8, 64)
    blk = model.layers[0]
    y = blk.feed_forward.w2(torch.nn.functional.silu(blk.feed_forward.w1(x)))
    y.sum().backward()
    assert blk.feed_forward.w1.weight.grad is not None


def test_root_linear_is_reported_not_swapped():
    lin = nn.Linear(64, 64)
    convert_model(lin, recipe("mxfp8", convert=["*"]))
    assert lin.mxfp8_report.kept == {"": "the root module cannot be swapped in place"}


@pytest.mark.parametrize("name", ["fp8-delayed", "mxfp8"])
def test_state_dict_loads_into_plain_model(name):
    model = Toy()
    convert_model(model, recipe(name))
    plain = Toy()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.layers[1].attention.wv.weight, model.layers[1].attention.wv.weight)
