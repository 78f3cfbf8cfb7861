"""Recipe validation, presets and dict/TOML round-trips."""

from __future__ import annotations

import tomllib

import pytest

from mxfp8.layers.recipe import (
    FORMAT_FIELDS,
    AmaxReduce,
    Fp8Format,
    Recipe,
    ScalingKind,
    list_recipes,
    recipe,
)

PRESETS = [
    "bf16",
    "fp32",
    "fp16",
    "mxfp8",
    "mxfp8-floor",
    "mxfp8-e5m2-grads",
    "mxfp8-wgrad-hp",
    "mxfp8-2d-weight",
    "mxfp8-attn",
    "mxfp8-adaptive",
    "fp8-tensorwise",
    "fp8-rowwise",
    "fp8-rowwise-gw-hp",
    "fp8-delayed",
    "fp8-delayed-ema",
]


def test_presets_listed_in_order():
    assert list_recipes() == PRESETS


def test_preset_contents():
    mx = recipe("mxfp8")
    assert mx.scaling is ScalingKind.MX and mx.block_size == 32 and mx.scale_rule == "rceil"
    assert {mx.fmt(g, o) for g, o in [("fprop", "input"), ("dgrad", "grad_output")]} == {
        Fp8Format.E4M3
    }
    assert recipe("mxfp8-floor").scale_rule == "floor"
    e5 = recipe("mxfp8-e5m2-grads")
    assert e5.dgrad_grad_output is Fp8Format.E5M2 and e5.wgrad_grad_output is Fp8Format.E5M2
    assert e5.fprop_input is Fp8Format.E4M3
    tw = recipe("fp8-tensorwise")
    assert tw.scaling is ScalingKind.TENSORWISE and tw.fprop_weight is Fp8Format.E4M3
    assert tw.dgrad_grad_output is Fp8Format.E5M2
    d = recipe("fp8-delayed")
    assert d.history_len == 16 and d.amax_reduce is AmaxReduce.MAX
    assert recipe("fp8-delayed-ema").amax_reduce is AmaxReduce.EMA
    rw = recipe("fp8-rowwise")
    assert rw.scaling is ScalingKind.ROWWISE and not rw.scaling.per_tensor and rw.hp_gemms == ()
    assert {getattr(rw, f) for f in FORMAT_FIELDS} == {Fp8Format.E4M3}
    assert recipe("fp8-rowwise-gw-hp").hp_gemms == ("wgrad",)
    assert not recipe("bf16").quantized


def test_loss_scaling_field():
    needs = {n: recipe(n).dynamic_loss_scaling for n in PRESETS}
    assert needs == {
        "bf16": False,
        "fp32": False,
        "fp16": True,
        "mxfp8": False,
        "mxfp8-floor": False,
        "mxfp8-e5m2-grads": False,
        "mxfp8-wgrad-hp": False,
        "mxfp8-2d-weight": False,
        "mxfp8-attn": False,
        "mxfp8-adaptive": False,
        "fp8-tensorwise": True,
        "fp8-rowwise": False,
        "fp8-rowwise-gw-hp": False,
        "fp8-delayed": True,
        "fp8-delayed-ema": True,
    }
    assert recipe("mxfp8").replace(scaling="tensorwise").dynamic_loss_scaling is True


def test_default_patterns_keep_embeddings_and_head():
    r = recipe("mxfp8")
    assert r.convert == ("layers.*",)
    assert "output" in r.keep_high_precision and "tok_embeddings" in r.keep_high_precision
    assert r.quantize_attention_bmm is False


@pytest.mark.parametrize("name", PRESETS)
def test_dict_round_trip(name):
    r = recipe(name)
    d = r.to_dict()
    assert all(isinstance(v, str | int | float | bool | list) for v in d.values())
    assert Recipe.from_dict(d) == r


@pytest.mark.parametrize("name", PRESETS)
def test_toml_round_trip(name):
    tiles = recipe(name).weight_block == "32x32"  # 2-D tiles are 32x32 only
    over = [{"pattern": "layers.0.*", "recipe": "bf16"}]
    r = recipe(name, block_size=32 if tiles else 16, keep_high_precision=["a.*", 'q"uote'],
               overrides=over, keep_last_blocks=1)  # fmt: skip
    text = r.to_toml()
    assert tomllib.loads(text) == r.to_dict()
    assert Recipe.from_toml(text) == r


def test_toml_round_trip_of_awkward_strings():
    """Quotes, backslashes, newlines and non-ASCII in patterns and the description survive."""
    r = recipe(
        "mxfp8",
        convert=['a"b', "c\\d", "e\nf", "é*"],
        keep_high_precision=[],
        description='says "hi"\tand\\more',
    )
    text = r.to_toml()
    assert tomllib.loads(text) == r.to_dict()
    back = Recipe.from_toml(text)
    assert back == r and back.description == r.description


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"scaling": "int8"}, "allowed: 'none', 'mx', 'tensorwise', 'delayed'"),
        ({"fprop_input": "e3m4"}, "allowed: 'e4m3', 'e5m2'"),
        ({"scale_rule": "round"}, "allowed: 'rceil', 'floor'"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"history_len": 0}, "history_len must be an int >= 1"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \(0, 1\)"),
        ({"amax_reduce": "mean"}, "allowed: 'max', 'ema'"),
        ({"backend": "cuda"}, "allowed: 'auto', 'emulated', 'scaled_mm'"),
        ({"keep_high_precision": "output"}, "list of fnmatch patterns"),
        ({"block_size": 16, "backend": "scaled_mm"}, "needs block_size 32"),
    ],
)
def test_invalid_fields_say_what_is_allowed(changes, message):
    with pytest.raises(ValueError, match=message):
        recipe("mxfp8", **changes)


def test_per_tensor_formats_must_agree():
    with pytest.raises(ValueError, match="dgrad_grad_output and wgrad_grad_output must be equal"):
        recipe("fp8-tensorwise", wgrad_grad_output="e4m3")
    with pytest.raises(ValueError, match="allowed for tensorwise scaling: 'auto', 'emulated'"):
        recipe("fp8-tensorwise", backend="scaled_mm")


def test_unknown_names_and_fields():
    with pytest.raises(ValueError, match="presets: bf16, fp32, fp16, mxfp8"):
        recipe("mxfp4")
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['blok_size'\]"):
        Recipe.from_dict({"blok_size": 32})
    with pytest.raises(KeyError, match="no operand 'weight' in GEMM 'wgrad'"):
        recipe("mxfp8").fmt("wgrad", "weight")


def test_quantize_attention_bmm_is_accepted_for_mx_recipes():
    r = recipe("mxfp8", quantize_attention_bmm=True)
    assert r.quantize_attention_bmm is True
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_toml(r.to_toml()) == r and "quantize_attention_bmm = true" in r.to_toml()
    assert recipe("mxfp8-floor").replace(quantize_attention_bmm=True).quantize_attention_bmm
    assert recipe("mxfp8", quantize_attention_bmm=False).quantize_attention_bmm is False


@pytest.mark.parametrize("name", ["fp8-delayed", "fp8-tensorwise", "fp8-rowwise", "bf16"])
def test_quantize_attention_bmm_is_refused_for_other_scalings(name):
    """Its BMMs are MX-quantized: another scaling would claim what does not run."""
    match = "quantize_attention_bmm=True is for MX recipes"
    with pytest.raises(ValueError, match=match):
        recipe(name, quantize_attention_bmm=True)
    data = {**recipe(name).to_dict(), "quantize_attention_bmm": True}
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict(data)
    text = (
        recipe(name)
        .to_toml()
        .replace("quantize_attention_bmm = false", "quantize_attention_bmm = true")
    )
    assert "quantize_attention_bmm = true" in text
    with pytest.raises(ValueError, match=match):
        Recipe.from_toml(text)
    with pytest.raises(ValueError, match=match):
        recipe(name).replace(quantize_attention_bmm=True)
    with pytest.raises(ValueError, match="must be true or false"):
        recipe("mxfp8", quantize_attention_bmm="yes")
    assert recipe(name, quantize_attention_bmm=False).quantize_attention_bmm is False


def test_frozen():
    r = recipe("mxfp8")
    with pytest.raises(AttributeError):
        r.block_size = 16  # type: ignore[misc]


def test_hp_gemms_for_mx_and_rowwise_only():
    assert recipe("fp8-rowwise", hp_gemms=["fprop"]).hp_gemms == ("fprop",)
    with pytest.raises(ValueError, match="hp_gemms is for MX and rowwise"):
        recipe("fp8-tensorwise", hp_gemms=("wgrad",))
