"""Every bf16 bit pattern, in blocks with the block max at different positions, for both
formats and both scale rules: the fast path equals the reference bit for bit.

The eager quantizers run the full sweep in the default suite. The compiled ones
(``compiled=True``, torch.compile'd: what training uses) run it for every (format, rule) on a
deterministic subset of the patterns in the default suite, where a first compile costs
seconds per (format, rule) and the data almost nothing; the full sweep over every layout is
``@pytest.mark.slow``. The subset always holds the patterns where bugs live: +-0, bf16
subnormals, every exponent's mantissas around the 1.75 boundary that separates the scale
rules (and its extremes 1.0 and 1.99), the largest finite value, +-inf and NaNs; and it is
also laid out so that each of those finite patterns is the largest value of its own block,
which is where the scale exponent is decided.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numerics_helpers import (
    BLOCK,
    LAYOUTS,
    assert_codes_equal,
    assert_same_bits,
    assert_scale_bits_equal,
)

from mxfp8 import E4M3, E5M2, fake_quantize, quantize
from mxfp8.numerics.reference import ref_dequantize, ref_quantize

_SUBSET_RANDOM = 1536  # random further patterns on top of the special ones
# mantissa fields of the normal binades: 1.0, 1.75 - 2^-7, 1.75 (the largest amax mantissa
# both rules scale alike), 1.75 + 2^-7 (rceil rounds the scale up, floor saturates),
# 1.8125 (scaled to E4M3's tie 464 under floor), 1.875 (E5M2's tie 61440), 1.9921875
_MANTISSAS = (0x00, 0x5F, 0x60, 0x61, 0x68, 0x70, 0x7F)
_TOP_MANTISSAS = (0x00, 0x60, 0x61, 0x68, 0x70, 0x7F)  # also tried as block maxima
_SUBNORMALS = (0x01, 0x02, 0x03, 0x3F, 0x40, 0x5F, 0x60, 0x61, 0x7F)
_NONFINITE = (0x7F80, 0x7F81, 0x7FC0, 0x7FFF)  # inf, NaNs
_MAX = 0x7F7F  # largest finite bf16


def _normals(mantissas) -> np.ndarray:
    return (np.arange(1, 255)[:, None] << 7 | np.array(mantissas)[None, :]).ravel()


def _special_patterns() -> np.ndarray:
    """bf16 bit patterns (int64, positive sign) that must be in every subset."""
    rest = np.array([0x0000, *_SUBNORMALS, _MAX, *_NONFINITE])
    return np.concatenate([_normals(_MANTISSAS), rest])


def _subset() -> torch.Tensor:
    """A deterministic subset of the 65,536 bf16 patterns as (blocks, 32) bf16, three ways.

    Both signs of every special pattern plus random others, (1) shuffled and (2) in pattern
    order (similar magnitudes per block); and (3) one block per finite non-zero special
    pattern of interest as a maximum (signs alternating), in which it is the largest |value|
    (at position i % 32) over 31 random smaller patterns of its sign. One tensor, so the
    compiled kernels see one shape; fewer elements than the full sweep.
    """
    rng = np.random.default_rng(2024)
    base = _special_patterns()
    patterns = np.concatenate([base, base | 0x8000])
    rest = np.setdiff1d(np.arange(1 << 16), patterns)
    patterns = np.concatenate([patterns, rng.choice(rest, _SUBSET_RANDOM, replace=False)])
    n = -(-patterns.size // BLOCK) * BLOCK
    patterns = np.concatenate([patterns, rng.choice(patterns, n - patterns.size)])
    shuffled = rng.permutation(patterns).reshape(-1, BLOCK)
    ordered = np.sort(patterns).reshape(-1, BLOCK)
    tops = np.concatenate([_normals(_TOP_MANTISSAS), _SUBNORMALS, [_MAX]])
    tops = tops | np.where(np.arange(tops.size) % 2 == 1, 0x8000, 0)
    # smaller |value|, same sign: a smaller 15-bit magnitude field (bf16 magnitudes are
    # ordered like their fields)
    below = (rng.random((tops.size, BLOCK)) * (tops[:, None] & 0x7FFF)).astype(np.int64)
    maxed = below | (tops[:, None] & 0x8000)
    maxed[np.arange(tops.size), np.arange(tops.size) % BLOCK] = tops
    bits = np.concatenate([shuffled, ordered, maxed]).astype(np.uint16)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


SUBSET = _subset()


def _reference_values(x: torch.Tensor, fmt, rule: str, dim: int = -1):
    """(codes, scale bits, dequantized values in x's dtype) of the reference quantizer."""
    codes, bits = ref_quantize(x.float().numpy(), fmt, scale_rule=rule, dim=dim)
    # exact: <= 4 significant bits; but near the top of the fp32 range a block max can round
    # up to 2^128, which overflows to inf in fp32 (the fast path does the same)
    with np.errstate(over="ignore"):
        values = ref_dequantize(codes, bits, fmt, dim=dim).astype(np.float32)
    return codes, bits, torch.from_numpy(values).to(x.dtype)


def _check_compiled(x: torch.Tensor, fmt, rule: str, dim: int = -1) -> None:
    """quantize and fake_quantize with compiled=True against the reference, bit for bit."""
    codes, bits, values = _reference_values(x, fmt, rule, dim)
    t = quantize(x, fmt, scale_rule=rule, dim=dim, compiled=True)
    assert_codes_equal(t.data, codes, fmt, inputs=x.float().numpy())
    assert_scale_bits_equal(t.scale, bits)
    assert_same_bits(fake_quantize(x, fmt, scale_rule=rule, dim=dim, compiled=True), values)


def test_subset_holds_the_special_patterns():
    bits = SUBSET.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    specials = [q for p in _special_patterns().tolist() for q in (p, p | 0x8000)]
    assert set(specials) <= set(bits.ravel().tolist())
    # ... and the chosen maxima, at every exponent, are each the largest |value| of a block
    magnitude = SUBSET.float().abs().nan_to_num(nan=math.inf)
    block_max = bits[np.arange(bits.shape[0]), magnitude.argmax(dim=1).numpy()] & 0x7FFF
    tops = {*_normals(_TOP_MANTISSAS).tolist(), *_SUBNORMALS, _MAX}
    assert tops <= set(block_max.tolist())
    assert SUBSET.numel() < 1 << 16  # a subset: cheaper than the full sweep


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


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_bf16_subset_compiled(fmt, rule):
    """The compiled kernels (which round with fp32 arithmetic, not an FP8 cast) on the subset:
    every format and rule in the default suite (bf16 input, the training layers' dtype)."""
    _check_compiled(SUBSET, fmt, rule)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_all_bf16_patterns_compiled(layout, fmt, rule):
    """The full sweep through the compiled kernels, every layout, bf16 and fp32 inputs."""
    x = LAYOUTS[layout]
    for src in (x, x.float()):
        _check_compiled(src, fmt, rule)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_all_bf16_patterns_compiled_along_dim0(fmt, rule):
    """The compiled kernels with blocks running down columns (the wgrad layout)."""
    _check_compiled(LAYOUTS["shuffled"].t().contiguous(), fmt, rule, dim=0)
