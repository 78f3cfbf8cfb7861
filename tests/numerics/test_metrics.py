"""The one definition of saturated / SQNR (mxfp8.numerics.metrics), on hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mxfp8 import E4M3, E5M2, quantize
from mxfp8.numerics.metrics import (
    SQNR_CAP_DB,
    mx_quant_stats,
    mx_saturated,
    saturation_bound,
    scaled_saturated,
    sqnr_db,
)
from mxfp8.stats.operand_stats import finalize, mx_stats


def test_sqnr_conventions():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == SQNR_CAP_DB  # exact
    assert sqnr_db(1.0, 1e-40) == SQNR_CAP_DB  # bounded, not 400 dB
    assert sqnr_db(0.0, 0.0) is None  # all zero: no signal, no SQNR
    assert sqnr_db(1.0, math.inf) == -SQNR_CAP_DB  # a finite value came back as inf


def test_overflow_to_inf_at_the_top_of_fp32_is_the_lower_bound_everywhere():
    """1.99 * 2^127: rceil scales it to 254.7, which rounds to 256; 256 * 2^120 = 2^128 is
    inf in fp32. An infinite error: -200 dB, still a JSON number."""
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 1.99 * 2.0**127, 1.0
    for fmt in (E4M3, E5M2):
        q = quantize(x, fmt)
        assert q.dequantize()[0, 0] == math.inf
        assert mx_quant_stats(x, fmt, "rceil").sqnr_db == -SQNR_CAP_DB
        row = finalize(mx_stats(x, q))
        assert row["sqnr_db"] == -SQNR_CAP_DB
        json.dumps(row, allow_nan=False)


def _unclamped(scaled: float, fmt) -> float:
    """Round half to even onto the element grid with no top exponent (by hand)."""
    quantum = 2.0 ** (max(math.floor(math.log2(scaled)), fmt.emin) - fmt.man_bits)
    return round(scaled / quantum) * quantum


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_saturated_is_what_the_clamp_changed(fmt):
    """Scaled values at the max, at the bound and one fp32 ulp above it, one block each
    (floor; amax mantissa >= 1.75 sets e = -emax): only the last one is counted, and it is
    the only one the clamp changed."""
    bound = np.float32(saturation_bound(fmt))
    scaled = np.array([fmt.max_finite, bound, np.nextafter(bound, np.float32(np.inf))])
    scaled = torch.from_numpy(scaled.astype(np.float32))
    x = torch.zeros(3, 32)
    x[:, 0] = scaled * 2.0**-fmt.emax
    q = quantize(x, fmt, scale_rule="floor")
    assert q.scale_exponent().flatten().tolist() == [-fmt.emax] * 3
    assert int(mx_saturated(x, q)[0]) == 1
    assert int(scaled_saturated(scaled, fmt)) == 1
    deq = (q.dequantize()[:, 0] * 2.0**fmt.emax).tolist()
    assert deq == [fmt.max_finite] * 3
    changed = [_unclamped(v, fmt) != d for v, d in zip(scaled.tolist(), deq, strict=True)]
    assert changed == [False, False, True]
