"""Hand-computed cases: ties, the 1.75 saturation boundary, special blocks, the exponent
clamp. Each checks explicit expected values *and* the reference, so a bug shared by both
implementations cannot hide."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numerics_helpers import assert_codes_equal, assert_same_bits, assert_scale_bits_equal

from mxfp8 import E4M3, E5M2, fake_quantize, quantize
from mxfp8.numerics.reference import ref_quantize, ref_scale_exponent

NAN, INF = float("nan"), float("inf")


def _block(*values: float, fill: float = 0.0, size: int = 32) -> torch.Tensor:
    x = torch.full((1, size), fill)
    x[0, : len(values)] = torch.tensor(values)
    return x


def _check_against_reference(x: torch.Tensor, fmt, rule) -> None:
    t = quantize(x, fmt, scale_rule=rule)
    codes, bits = ref_quantize(x.numpy(), fmt, scale_rule=rule)
    assert_codes_equal(t.data, codes, fmt, inputs=x.numpy())
    assert_scale_bits_equal(t.scale, bits)
    assert_same_bits(fake_quantize(x, fmt, scale_rule=rule), t.dequantize())


@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_ties_round_to_even(rule):
    # amax 448 -> scale 2^0 under both rules for E4M3; the grid step in [1, 2) is 1/8
    x = _block(448.0, 1.0625, 1.1875, -1.0625, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-11)
    t = quantize(x, E4M3, scale_rule=rule)
    assert t.scale_exponent().item() == 0
    got = t.dequantize()[0, :8].tolist()
    # 1.0625 -> 1 (even), 1.1875 -> 1.25 (even), 2^-10 (half the smallest subnormal) -> 0,
    # 3 * 2^-10 -> 2^-8 (1.5 subnormal steps -> 2), 5 * 2^-10 -> 2^-8 (2.5 -> 2), 2^-11 -> 0
    assert got == [448.0, 1.0, 1.25, -1.0, 0.0, 2.0**-8, 2.0**-8, 0.0]
    _check_against_reference(x, E4M3, rule)


def test_e5m2_tie():
    # amax 57344 -> scale 2^0; the step in [1, 2) is 1/4: 1.125 -> 1.0, 1.375 -> 1.5
    x = _block(57344.0, 1.125, 1.375)
    assert quantize(x, E5M2).dequantize()[0, :3].tolist() == [57344.0, 1.0, 1.5]
    _check_against_reference(x, E5M2, "rceil")


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_saturation_boundary(fmt):
    """A block max whose mantissa is 1.75 fits exactly; just above it, rceil moves up one
    exponent (nothing saturates) while floor keeps the exponent and saturates."""
    k = 3
    at = 1.75 * 2.0**k
    above = float(np.nextafter(np.float32(at), np.float32(np.inf)))
    below = float(np.nextafter(np.float32(at), np.float32(0)))
    base = k - fmt.emax
    for amax, rceil_e, floor_e in [(at, base, base), (above, base + 1, base), (below, base, base)]:
        x = _block(amax, -amax / 3)
        r = quantize(x, fmt, scale_rule="rceil")
        f = quantize(x, fmt, scale_rule="floor")
        assert r.scale_exponent().item() == rceil_e, amax
        assert f.scale_exponent().item() == floor_e, amax
        for rule in ("rceil", "floor"):
            _check_against_reference(x, fmt, rule)
    x = _block(above)
    assert quantize(x, fmt, scale_rule="floor").data.float()[0, 0].item() == fmt.max_finite
    # the whole region past 1.75 saturates under floor, never beyond max_finite or to NaN
    x = _block(1.99 * 2.0**k, -1.99 * 2.0**k, 1.9999999 * 2.0**k)
    data = quantize(x, fmt, scale_rule="floor").data.float()[0, :3].tolist()
    assert data == [fmt.max_finite, -fmt.max_finite, fmt.max_finite]
    _check_against_reference(x, fmt, "floor")


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_special_blocks(fmt, rule):
    x = torch.cat(
        [
            _block(),  # all zeros
            _block(-0.0, fill=-0.0),  # negative zeros
            _block(1.0, NAN, 2.0),
            _block(INF, 1.0),
            _block(-INF, -1.0),
            _block(NAN, INF, -INF, fill=NAN),
            _block(3.0, -5.0),  # an ordinary block next to the special ones
        ]
    )
    t = quantize(x, fmt, scale_rule=rule)
    bits = t.scale.view(torch.uint8)[:, 0].tolist()
    assert bits[:2] == [0, 0]
    assert bits[2:6] == [255] * 4
    assert bits[6] not in (0, 255)
    codes = t.data.view(torch.uint8)
    assert (codes[0] == 0).all() and (codes[1] == 0x80).all()
    assert (codes[2:6] == 0x7F).all()
    out = t.dequantize()
    assert (out[:2] == 0).all() and out[2:6].isnan().all() and out[6].isfinite().all()
    _check_against_reference(x, fmt, rule)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_fp32_subnormals_are_not_flushed(fmt):
    # a block of fp32 subnormals: scale clamps at 2^-127; E5M2 keeps 2^-140 exactly
    x = _block(2.0**-140, -(2.0**-141), 2.0**-149)
    t = quantize(x, fmt)
    assert t.scale_exponent().item() == -127
    if fmt is E5M2:
        assert t.dequantize()[0, :2].tolist() == [2.0**-140, -(2.0**-141)]
    # a subnormal next to a normal value is quantized, not flushed first
    y = _block(2.0**-120, 2.0**-127)
    assert quantize(y, fmt).dequantize()[0, 1].item() == 2.0**-127
    for rule in ("rceil", "floor"):
        _check_against_reference(x, fmt, rule)
        _check_against_reference(y, fmt, rule)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_exponent_clamp_both_ends(fmt):
    # low end: a tiny amax would want e < -127
    x = _block(2.0**-149)
    assert quantize(x, fmt).scale_exponent().item() == -127
    assert quantize(x, fmt, scale_rule="floor").scale_exponent().item() == -127
    # high end: the largest fp32 needs e = 127 - emax + 1 (rceil), below the clamp
    big = float(torch.finfo(torch.float32).max)
    x = _block(big, -big)
    assert quantize(x, fmt).scale_exponent().item() == 128 - fmt.emax
    assert quantize(x, fmt, scale_rule="floor").scale_exponent().item() == 127 - fmt.emax
    for rule in ("rceil", "floor"):
        _check_against_reference(x, fmt, rule)
    # fp32 inputs cannot reach e > 127; the reference clamps there too
    assert ref_scale_exponent(np.array([2.0**200]), fmt, "rceil")[0] == 254
    assert ref_scale_exponent(np.array([2.0**-200]), fmt, "floor")[0] == 0


def test_dequantize_can_overflow_fp32_near_its_top():
    """Documented edge: a block max within 1/8 below 2^128 rounds up to 2^128 -> inf."""
    x = _block(float(torch.finfo(torch.float32).max))
    assert math.isinf(quantize(x, E4M3).dequantize()[0, 0].item())


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_scale_bits_for_every_fp32_exponent(fmt, rule):
    """The bit trick of backends.eager.e8m0_bits against the reference, for every fp32 exponent
    field and the mantissas around 1.75 (plus a random sample)."""
    from mxfp8.numerics.backends.eager import e8m0_bits

    mantissas = torch.tensor([0, 1, 0x400000, 0x5FFFFF, 0x600000, 0x600001, 0x7FFFFE, 0x7FFFFF])
    mantissas = torch.cat([mantissas, torch.randint(0, 1 << 23, (24,))])
    exps = torch.arange(256)
    bits = (exps[:, None] << 23 | mantissas[None, :]).reshape(-1).to(torch.int32)
    amax = bits.view(torch.float32)
    got, nonfinite = e8m0_bits(amax, fmt, rule)
    got = torch.where(nonfinite, 255, got)
    want = ref_scale_exponent(amax.double().numpy(), fmt, rule)
    assert_scale_bits_equal(got.numpy(), want)
