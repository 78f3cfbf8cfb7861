"""mxfp8-wgrad-hp (the weight-gradient GEMM unquantized) and 32x32 weight tiles
(mxfp8-2d-weight), each against an explicit computation (configurations of
test_linear_exact: one operand of each GEMM is a scaled permutation, so the products are
exact whatever the accumulation order)."""

from __future__ import annotations

import pytest
import torch
from linear_exact_helpers import CONFIGS, EXACT, S, _q, _ref, _run

from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe
from mxfp8.layers.step import step_window
from mxfp8.numerics.quantize import quantize
from mxfp8.numerics.tiles import quantize_tiles, quantize_tiles_pair


def _same(a, b):
    return torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(
        a.scale_bits(), b.scale_bits()
    )


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_wgrad_hp_is_mx_forward_and_dgrad_and_an_unquantized_wgrad(config, autocast):
    r = recipe("mxfp8-wgrad-hp", convert=("*",))
    x, w, dy = (f() for f in CONFIGS[config])
    dt = torch.bfloat16 if autocast else torch.float32
    y, dx, dw = _run(x, w, dy, r, autocast)
    ry, rdx, rdw_mx = _ref(x, w, dy, r, dt)
    for key, a, b in (("y", y, ry), ("dx", dx, rdx.to(dt).float())):
        if key in EXACT[config]:
            assert torch.equal(a, b.to(a.dtype)), key
    # dW = dy^T x from the unquantized tensors, in the compute dtype, as nn.Linear computes it
    want = torch.mm(dy.to(dt).t(), x.to(dt)).float()
    assert torch.equal(dw, want)
    if config in ("dense-dy-cols", "dense-x-cols"):  # where an MX wgrad would differ
        assert not torch.equal(dw, rdw_mx.to(dt).float())


def test_wgrad_hp_observer_sees_four_operands():
    layer = MXLinear(S, S, bias=False, recipe=recipe("mxfp8-wgrad-hp"))
    seen = []
    layer.observer = lambda _l, gemm, operand, hp, q: seen.append((gemm, operand))
    layer(torch.randn(S, S, requires_grad=True)).sum().backward()
    assert sorted(seen) == [("dgrad", "grad_output"), ("dgrad", "weight"), ("fprop", "input"),
                            ("fprop", "weight")]  # fmt: skip


def _wide(seed, rows=S, cols=S):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-20, 5, (rows, cols), generator=g).float())
    return torch.randn(rows, cols, generator=g) * mag


@pytest.mark.parametrize("rule", ["rceil", "floor"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_tiles_of_the_transpose_are_the_transposed_tiles(fmt, rule):
    w = _wide(1, 96, 160)
    row, col = quantize_tiles_pair(w, fmt, scale_rule=rule)
    t_row, t_col = quantize_tiles_pair(w.t().contiguous(), fmt, scale_rule=rule)
    # the copy of W along its dim 1 is, transposed, the copy of W^T along its dim 0
    assert torch.equal(row.data.view(torch.uint8).t(), t_col.data.view(torch.uint8))
    assert torch.equal(row.scale_bits().t(), t_col.scale_bits())
    assert torch.equal(col.scale_bits().t(), t_row.scale_bits())
    assert torch.equal(row.dequantize().t(), t_row.dequantize())
    assert _same(row, quantize_tiles(w, fmt, dim=1, scale_rule=rule))
    assert _same(col, quantize_tiles(w, fmt, dim=0, scale_rule=rule))
    # 1x32 blocks do not have the property on this data (so the test can fail)
    assert not torch.equal(quantize(w, fmt, dim=1).dequantize().t(),
                           quantize(w.t().contiguous(), fmt, dim=1).dequantize())  # fmt: skip


@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_a_tile_takes_the_largest_scale_of_its_row_blocks(rule):
    """The scale rule is monotone in amax, and a tile's amax is its row blocks' largest: so
    the tile scale is the largest 1x32 scale in the tile, and the row block that holds the
    tile's amax is quantized exactly as the 1x32 quantizer quantizes it."""
    w = _wide(2, 64, 128)
    tiles = quantize_tiles(w, "e4m3", dim=1, scale_rule=rule)
    rows = quantize(w, "e4m3", dim=1, scale_rule=rule)
    e_rows = rows.scale_exponent().reshape(2, 32, 4)
    e_tile = tiles.scale_exponent().reshape(2, 32, 4)
    assert torch.equal(e_tile, e_rows.amax(1, keepdim=True).expand_as(e_tile))
    assert (e_rows < e_tile).any()  # some rows lose precision: the property is not vacuous
    blocks = w.abs().reshape(2, 32, 4, 32).amax(-1)  # [tile row, row, tile col]
    top = blocks.argmax(1)  # the row of each tile that holds its amax
    codes_t, codes_r = tiles.data.view(torch.uint8), rows.data.view(torch.uint8)
    for i in range(2):
        for j in range(4):
            r = i * 32 + int(top[i, j])
            cols = slice(32 * j, 32 * j + 32)
            assert torch.equal(codes_t[r, cols], codes_r[r, cols])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_2d_weight_layer_uses_the_tile_copy_in_fprop_and_dgrad(autocast):
    r = recipe("mxfp8-2d-weight", convert=("*",))
    x, w, dy = (f() for f in CONFIGS["dense-w"])  # dense W: y, dx and dW exact
    dt = torch.bfloat16 if autocast else torch.float32
    y, dx, dw = _run(x, w, dy, r, autocast)
    d = torch.float64
    wt = quantize_tiles(w, "e4m3").dequantize(d)
    ry = _q(x, r.fprop_input, -1, r).dequantize(d) @ wt.T
    rdx = _q(dy, r.dgrad_grad_output, -1, r).dequantize(d) @ wt
    assert torch.equal(y, ry.to(dt)) and torch.equal(dx, rdx.to(dt).float())
    _, _, rdw = _ref(x, w, dy, r, dt)
    assert torch.equal(dw, rdw.to(dt).float())  # wgrad has no weight operand: unchanged
    y1, dx1, _ = _run(x, w, dy, recipe("mxfp8", convert=("*",)), autocast)
    assert not torch.equal(y, y1) and not torch.equal(dx, dx1)  # the tiles are used


def test_2d_weight_is_quantized_once_per_step_window():
    def window(name):
        layer = MXLinear(S, S, bias=False, recipe=recipe(name))
        with step_window(layer, micro_batches=2):
            for _ in range(2):
                layer(torch.randn(S, S, requires_grad=True)).sum().backward()
            held = layer.weight_cache_nbytes()
        return layer.weight_quantizations, held

    tiles, rows = window("mxfp8-2d-weight"), window("mxfp8")
    assert tiles[0] == 1 and rows[0] == 2
    assert tiles[1] == S * S + 2 * S * S // 32  # one codes tensor, two scale layouts
    assert rows[1] == 2 * (S * S + S * S // 32)


def _row_sqnr(w, deq):
    """Mean over rows of each row's SQNR in dB (a tile's small rows show here)."""
    sig = (w.double() ** 2).sum(1)
    noise = ((w - deq).double() ** 2).sum(1)
    return float((10 * torch.log10(sig / noise)).mean())


def test_tiles_cost_sqnr_against_1x32_only_where_rows_differ_in_size():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g) * 0.02
    scaled = w * torch.exp2(-torch.randint(0, 16, (256, 1), generator=g).float())
    got = {
        (name, kind): _row_sqnr(x, deq(x))
        for name, x in (("gauss", w), ("rows", scaled))
        for kind, deq in (
            ("1x32", lambda t: quantize(t, "e4m3").dequantize()),
            ("32x32", lambda t: quantize_tiles(t, "e4m3").dequantize()),
        )
    }
    # measured: Gaussian 31.59 dB both; rows spread over 16 octaves: 31.59 vs 29.94 dB
    assert abs(got["gauss", "32x32"] - got["gauss", "1x32"]) < 0.1
    assert got["rows", "1x32"] > 31.0
    assert got["rows", "1x32"] - got["rows", "32x32"] > 1.0


@pytest.mark.parametrize("fprop, dgrad", [("e4m3", "e5m2"), ("e5m2", "e4m3")])
def test_2d_weight_with_other_fprop_and_dgrad_weight_formats_is_refused(fprop, dgrad):
    """One tile copy serves fprop and dgrad, so it has one format: a recipe asking for two
    would silently run dgrad in the fprop format (issue 22)."""
    with pytest.raises(ValueError) as e:
        recipe("mxfp8-2d-weight", fprop_weight=fprop, dgrad_weight=dgrad)
    message = str(e.value)
    assert "32x32" in message and "fprop_weight" in message and "dgrad_weight" in message
    assert f"{fprop} and {dgrad}" in message
    same = recipe("mxfp8-2d-weight", fprop_weight="e5m2", dgrad_weight="e5m2")  # one format
    assert same.fmt("dgrad", "weight") is same.fmt("fprop", "weight")
    rows = recipe("mxfp8", fprop_weight=fprop, dgrad_weight=dgrad)  # 1x32: two copies, fine
    assert rows.dgrad_weight.value == dgrad


def test_2d_weight_format_clash_is_a_config_error_naming_the_fields():
    from mxfp8.config.fields import ConfigError
    from mxfp8.config.train_config import load_config

    with pytest.raises(ConfigError, match=r"\[recipe\] .*fprop_weight.*dgrad_weight"):
        load_config(None, {"recipe.name": "mxfp8-2d-weight", "recipe.dgrad_weight": "e5m2"})
