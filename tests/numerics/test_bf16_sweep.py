"""Every bf16 bit pattern, in blocks with the block max at different positions, for both
formats and both scale rules: the fast path equals the reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics_helpers import assert_codes_equal, assert_same_bits, assert_scale_bits_equal

from mxfp8 import E4M3, E5M2, fake_quantize, quantize
from mxfp8.numerics.reference import ref_dequantize, ref_quantize

BLOCK = 32


def _all_bf16() -> torch.Tensor:
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _max_at(blocks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Swap each block's largest |value| into the given position."""
    blocks = blocks.clone()
    rows = torch.arange(blocks.shape[0])
    arg = blocks.float().abs().nan_to_num(nan=float("inf")).argmax(dim=1)
    big, other = blocks[rows, arg].clone(), blocks[rows, positions].clone()
    blocks[rows, positions], blocks[rows, arg] = big, other
    return blocks


def _layouts() -> dict[str, torch.Tensor]:
    """(2048, 32) bf16 block arrangements of all 65,536 patterns."""
    x = _all_bf16().reshape(-1, BLOCK)  # consecutive patterns: similar magnitudes per block
    perm = torch.randperm(1 << 16, generator=torch.Generator().manual_seed(0))
    shuffled = _all_bf16()[perm].reshape(-1, BLOCK)  # mixed magnitudes, scattered NaN/Inf
    finite = torch.where(shuffled.isfinite(), shuffled, torch.zeros((), dtype=torch.bfloat16))
    pos = torch.arange(finite.shape[0]) % BLOCK
    return {
        "ordered": x,  # block max last (magnitudes grow with the pattern)
        "reversed": x.flip(1),  # block max first
        "shuffled": shuffled,
        "finite-max-everywhere": _max_at(finite, pos),  # block max at every position
    }


LAYOUTS = _layouts()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_all_bf16_patterns_match_reference(layout, fmt, rule):
    x = LAYOUTS[layout]
    x32 = x.float()
    want_codes, want_bits = ref_quantize(x32.numpy(), fmt, scale_rule=rule)
    for src in (x, x32):  # the bf16 and fp32 entry points
        t = quantize(src, fmt, scale_rule=rule)
        assert_codes_equal(t.data, want_codes, fmt, inputs=x32.numpy())
        assert_scale_bits_equal(t.scale, want_bits)
    want_values = ref_dequantize(want_codes, want_bits, fmt)
    # exact: <= 4 significant bits; but near the top of the fp32 range a block max can round
    # up to 2^128, which overflows to inf in fp32 (the fast path does the same)
    with np.errstate(over="ignore"):
        want32 = torch.from_numpy(want_values.astype(np.float32))
    assert_same_bits(fake_quantize(x32, fmt, scale_rule=rule), want32)
    assert_same_bits(fake_quantize(x, fmt, scale_rule=rule), want32.to(torch.bfloat16))
    assert_same_bits(t.dequantize(), want32)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_all_bf16_patterns_along_dim0(fmt, rule):
    """The same sweep with blocks running down columns (the wgrad layout)."""
    x = LAYOUTS["shuffled"].t().contiguous()  # (32, 2048): each column one block
    want_codes, want_bits = ref_quantize(x.float().numpy(), fmt, scale_rule=rule, dim=0)
    t = quantize(x, fmt, scale_rule=rule, dim=0)
    assert t.scale.shape == (1, 2048)
    assert_codes_equal(t.data, want_codes, fmt, inputs=x.float().numpy())
    assert_scale_bits_equal(t.scale, want_bits)
    assert_same_bits(fake_quantize(x, fmt, scale_rule=rule, dim=0), t.dequantize(torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_all_bf16_patterns_compiled(fmt, rule):
    """The compiled kernels (which round with fp32 arithmetic, not an FP8 cast) on the sweep."""
    x = LAYOUTS["shuffled"]
    want_codes, want_bits = ref_quantize(x.float().numpy(), fmt, scale_rule=rule)
    t = quantize(x, fmt, scale_rule=rule, compiled=True)
    assert_codes_equal(t.data, want_codes, fmt, inputs=x.float().numpy())
    assert_scale_bits_equal(t.scale, want_bits)
    assert_same_bits(fake_quantize(x, fmt, scale_rule=rule, compiled=True), t.dequantize(x.dtype))
