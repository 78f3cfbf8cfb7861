"""Format facts, name parsing, and every FP8 / E8M0 code against torch's own casts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numerics_helpers import assert_codes_equal

from mxfp8 import E4M3, E5M2, ElemFormat, ScaleRule
from mxfp8.numerics.backends import eager as kernels
from mxfp8.numerics.formats import as_format
from mxfp8.numerics.reference import ref_decode, ref_encode, ref_round

ALL_CODES = np.arange(256, dtype=np.uint8)


def test_format_facts():
    assert (E4M3.max_finite, E4M3.emax, E4M3.bias, E4M3.emin) == (448.0, 8, 7, -6)
    assert (E5M2.max_finite, E5M2.emax, E5M2.bias, E5M2.emin) == (57344.0, 15, 15, -14)
    assert E4M3.min_subnormal == 2.0**-9 and E5M2.min_subnormal == 2.0**-16
    assert E4M3.max_mantissa_bits == E5M2.max_mantissa_bits == 0x600000  # 1.75
    for fmt in (E4M3, E5M2):
        assert torch.finfo(fmt.torch_dtype).max == fmt.max_finite
        assert torch.finfo(fmt.torch_dtype).tiny == fmt.min_normal


def test_names_and_rules_parse():
    assert as_format("E4M3") is E4M3 and ElemFormat.from_name("e5m2") is E5M2
    assert as_format(torch.float8_e5m2) is E5M2 and as_format(E4M3) is E4M3
    assert ScaleRule.parse("RCEIL") is ScaleRule.RCEIL and ScaleRule.parse("floor").value == "floor"
    with pytest.raises(ValueError, match="element format"):
        as_format("e3m4")
    with pytest.raises(ValueError, match="scale rule"):
        ScaleRule.parse("ceil")


def test_inconsistent_format_is_rejected():
    with pytest.raises(ValueError):
        ElemFormat("bad", 4, 3, 7, 480.0, 8, 2.0**-6, 2.0**-9, torch.float8_e4m3fn)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_every_code_round_trips(fmt):
    """decode(code) in the reference equals torch's fp8 -> fp32, and encoding it back (both
    the reference encoder and torch's fp32 -> fp8 cast) gives the same code."""
    codes = torch.from_numpy(ALL_CODES.copy()).view(fmt.torch_dtype)
    torch_values = codes.float().numpy().astype(np.float64)
    ref_values = ref_decode(ALL_CODES, fmt)
    assert np.array_equal(np.isnan(torch_values), np.isnan(ref_values))
    finite = np.isfinite(ref_values)
    assert np.array_equal(torch_values[finite], ref_values[finite])
    assert np.array_equal(np.isinf(torch_values), np.isinf(ref_values))
    # finite codes re-encode to themselves, through the reference and through torch
    v = ref_values[finite]
    assert np.array_equal(ref_round(v, fmt), np.abs(v))  # grid values are fixed points
    assert_codes_equal(ref_encode(np.abs(v), np.signbit(v), fmt), ALL_CODES[finite], fmt)
    back = torch.from_numpy(v.astype(np.float32)).to(fmt.torch_dtype)
    assert_codes_equal(back, ALL_CODES[finite], fmt)
    expected_nans = 2 if fmt is E4M3 else 6
    assert int(np.isnan(ref_values).sum()) == expected_nans
    assert np.nanmax(ref_values[finite]) == fmt.max_finite


def test_every_e8m0_code():
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = kernels.scale_bits_to_float(bits)
    theirs = bits.view(torch.float8_e8m0fnu).float()
    for b in range(255):
        assert ours[b].item() == theirs[b].item() == math.ldexp(1.0, b - 127), b
    assert math.isnan(ours[255].item()) and math.isnan(theirs[255].item())
    e = torch.arange(255, dtype=torch.int32)
    assert torch.equal(kernels.scale_float(e), ours[:255])
    inv = kernels.inverse_scale_float(e)
    assert all(inv[b].item() == math.ldexp(1.0, 127 - b) for b in range(255))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_round_to_grid_equals_the_fp8_cast(fmt):
    """The compiled path's fp32-arithmetic rounding against torch's RNE cast: every fp32
    mantissa of one normal binade (rounding is scale-invariant there), and every 3rd
    mantissa (both signs) below and across the smallest normal and in the top binade."""
    mantissas = torch.arange(1 << 23, dtype=torch.int32)
    binades = [(0, mantissas, False)]  # biased exponent offset from 127, mantissas, negatives
    for exp in (fmt.emin - fmt.man_bits - 2, fmt.emin - 1, fmt.emin, fmt.emax):
        binades.append((exp, mantissas[::3], True))
    for exp, mant, negatives in binades:
        y = (mant | ((exp + 127) << 23)).view(torch.float32)
        y = torch.cat([y, -y]) if negatives else y
        y = y[y.abs() <= fmt.max_finite]
        want = y.to(fmt.torch_dtype).float()
        got = kernels.round_to_grid(y, fmt)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), exp  # -0 too
