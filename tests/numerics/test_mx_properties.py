"""Property tests: random shapes, dims, dtypes, block sizes and values (specials included),
fast path against the reference bit for bit."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numerics_helpers import assert_codes_equal, assert_same_bits, assert_scale_bits_equal

from mxfp8 import E4M3, E5M2, fake_quantize, quantize
from mxfp8.numerics.reference import ref_quantize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def cases(draw):
    block = draw(st.sampled_from([1, 2, 4, 8, 32]))
    rank = draw(st.integers(1, 4))
    dim = draw(st.integers(-rank, rank - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    shape[dim] = block * draw(st.integers(1, 3))
    values = draw(
        arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=True, allow_infinity=True))
    )
    # scaled copies too: the element strategy favours small magnitudes
    with np.errstate(over="ignore"):  # overflow to inf is one more special value
        values = values * np.float32(2.0) ** np.float32(draw(st.integers(-60, 60)))
    dtype = draw(st.sampled_from(DTYPES))
    fmt = draw(st.sampled_from([E4M3, E5M2]))
    rule = draw(st.sampled_from(["rceil", "floor"]))
    return torch.from_numpy(values).to(dtype), block, dim, fmt, rule


@settings(max_examples=150, deadline=None)
@given(cases())
def test_quantize_matches_reference(case):
    x, block, dim, fmt, rule = case
    t = quantize(x, fmt, block_size=block, dim=dim, scale_rule=rule)
    codes, bits = ref_quantize(x.float().numpy(), fmt, block_size=block, dim=dim, scale_rule=rule)
    assert_codes_equal(t.data, codes, fmt, inputs=x.float().numpy())
    assert_scale_bits_equal(t.scale, bits)
    assert_same_bits(
        fake_quantize(x, fmt, block_size=block, dim=dim, scale_rule=rule), t.dequantize(x.dtype)
    )


@settings(max_examples=60, deadline=None)
@given(cases())
def test_block_max_lands_where_the_rule_says(case):
    """rceil puts a block max in [dest_max / 2, dest_max], floor in [2^emax, dest_max]
    (after rounding), unless the exponent was clamped; non-finite never becomes finite."""
    x, block, dim, fmt, rule = case
    out = fake_quantize(x, fmt, block_size=block, dim=dim, scale_rule=rule)
    assert not out[~x.isfinite()].isfinite().any()
    t = quantize(x, fmt, block_size=block, dim=dim, scale_rule=rule)
    bits = t.scale.view(torch.uint8).movedim(t.dim, -1).reshape(-1).long()
    codes = t.data.float().abs().movedim(t.dim, -1).reshape(-1, block)  # one block per row
    block_max = codes.amax(dim=1)
    normal = (bits > 0) & (bits < 255)  # not clamped at 2^-127, not a NaN block
    low = fmt.max_finite / 2 if rule == "rceil" else 2.0**fmt.emax
    assert (block_max[normal] >= low).all() and (block_max[normal] <= fmt.max_finite).all()
