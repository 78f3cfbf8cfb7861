"""The oracle: MX quantization written straight from the spec, in numpy float64 and integers.

Deliberately independent of the fast path in ``backends/eager.py``: no torch arithmetic, no fp32
bit tricks, no FP8 casts. Every step is exact in float64 (fp32 inputs, powers of two and
FP8 values all fit with room to spare), so the only roundings are the ones the spec asks for:
``np.rint`` (round half to even) onto the element grid, then saturation.

Vectorized across blocks and elements with ``np.where`` so that exhaustive sweeps (every
bf16 bit pattern) run in seconds, but each line is the spec's definition, not an optimization.
"""

from __future__ import annotations

import numpy as np

from mxfp8.numerics.formats import (
    E8M0_BIAS,
    E8M0_NAN,
    SCALE_EXP_MAX,
    SCALE_EXP_MIN,
    ElemFormat,
    ScaleRule,
    as_format,
)

__all__ = [
    "ref_scale_exponent",
    "ref_encode",
    "ref_decode",
    "ref_quantize_blocks",
    "ref_quantize",
    "ref_dequantize",
]

NAN_CODE = 0x7F  # the FP8 code every element of a NaN/Inf block gets (both formats)


def _floor_log2(a: np.ndarray) -> np.ndarray:
    """floor(log2(a)) for finite a > 0, exactly: frexp gives a = m * 2^k with m in [0.5, 1)."""
    _, k = np.frexp(a)
    return k.astype(np.int64) - 1


def ref_scale_exponent(
    amax: np.ndarray, fmt: ElemFormat | str, rule: ScaleRule | str
) -> np.ndarray:
    """E8M0 bits (int64 0..255) of blocks with the given float64 amax."""
    fmt, rule = as_format(fmt), ScaleRule.parse(rule)
    finite = np.isfinite(amax)
    pos = finite & (amax > 0)
    safe = np.where(pos, amax, 1.0)
    e = _floor_log2(safe) - fmt.emax  # the OCP "floor" rule
    if rule is ScaleRule.RCEIL:
        # smallest e with amax <= dest_max * 2^e, i.e. ceil(log2(amax / dest_max)); since
        # amax < 2^(floor+1), it is the floor rule's e or one more.
        e = np.where(safe <= np.ldexp(fmt.max_finite, e), e, e + 1)
    e = np.clip(e, SCALE_EXP_MIN, SCALE_EXP_MAX)
    e = np.where(pos, e, SCALE_EXP_MIN)  # all-zero block: bits 0
    return np.where(finite, e + E8M0_BIAS, E8M0_NAN)


def ref_round(y: np.ndarray, fmt: ElemFormat) -> np.ndarray:
    """|y| (float64, finite) rounded half-to-even onto the format's grid, saturating."""
    a = np.abs(y)
    ex = np.maximum(_floor_log2(np.where(a > 0, a, 1.0)), fmt.emin)  # subnormals share emin
    quantum = np.ldexp(1.0, ex - fmt.man_bits)
    q = np.rint(a / quantum) * quantum  # exact division by a power of two, then RNE
    return np.minimum(q, fmt.max_finite)


def ref_encode(value: np.ndarray, negative: np.ndarray, fmt: ElemFormat) -> np.ndarray:
    """FP8 codes (uint8) of non-negative grid values with the given signs, by bit fields."""
    v = np.asarray(value, dtype=np.float64)
    ex = _floor_log2(np.where(v > 0, v, 1.0))
    normal = (v > 0) & (ex >= fmt.emin)
    exp_field = np.where(normal, ex + fmt.bias, 0)
    man = np.where(
        normal,
        (np.ldexp(v, -ex) - 1.0) * 2**fmt.man_bits,  # 1.m -> m as an integer
        np.ldexp(v, fmt.man_bits - fmt.emin),  # subnormal: v / 2^(emin - man_bits)
    )
    code = (exp_field << fmt.man_bits) | man.astype(np.int64)
    return (np.where(negative, 0x80, 0) | code).astype(np.uint8)


def ref_decode(codes: np.ndarray, fmt: ElemFormat) -> np.ndarray:
    """FP8 codes -> float64 values (NaN, and +-inf for E5M2's infinity codes)."""
    c = np.asarray(codes).astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp_field = (c >> fmt.man_bits) & ((1 << fmt.exp_bits) - 1)
    man = c & ((1 << fmt.man_bits) - 1)
    frac = man / 2**fmt.man_bits
    value = np.where(
        exp_field == 0,
        np.ldexp(frac, fmt.emin),
        np.ldexp(1.0 + frac, exp_field - fmt.bias),
    )
    top = exp_field == (1 << fmt.exp_bits) - 1
    if fmt.name == "e4m3":  # "fn": only S.1111.111 is special (NaN), no infinities
        value = np.where(top & (man == 7), np.nan, value)
    else:  # IEEE-like: S.11111.00 is infinity, other top-exponent codes are NaN
        value = np.where(top, np.where(man == 0, np.inf, np.nan), value)
    return sign * value


def ref_quantize_blocks(blocks: np.ndarray, fmt: ElemFormat | str, rule: ScaleRule | str):
    """Quantize float32 blocks of shape (nblocks, block_size).

    Returns (codes uint8 (nblocks, block_size), scale bits uint8 (nblocks,)).
    """
    fmt = as_format(fmt)
    rule = ScaleRule.parse(rule)
    with np.errstate(invalid="ignore"):  # NaN inputs are expected, not an error
        x = np.asarray(blocks, dtype=np.float32).astype(np.float64)  # exact widening
        amax = np.max(np.abs(x), axis=1)  # NaN if the block holds a NaN
    bits = ref_scale_exponent(amax, fmt, rule)
    finite = bits != E8M0_NAN
    e = np.where(finite, bits - E8M0_BIAS, 0)
    y = np.ldexp(np.where(np.isfinite(x), x, 0.0), -e[:, None])  # exact: power-of-two scaling
    codes = ref_encode(ref_round(y, fmt), np.signbit(x), fmt)
    codes = np.where(finite[:, None], codes, NAN_CODE).astype(np.uint8)
    return codes, bits.astype(np.uint8)


def ref_quantize(
    x: np.ndarray,
    fmt: ElemFormat | str,
    *,
    block_size: int = 32,
    dim: int = -1,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
):
    """Quantize an fp32 array of any rank along ``dim`` (size a multiple of block_size).

    Returns (codes uint8, x's shape; scale bits uint8, size[dim] // block_size along dim).
    """
    x = np.asarray(x, dtype=np.float32)
    moved = np.moveaxis(x, dim, -1)
    lead = moved.shape[:-1]
    nblocks = moved.shape[-1] // block_size
    blocks = moved.reshape(-1, block_size)  # consecutive elements along dim form a block
    codes, bits = ref_quantize_blocks(blocks, fmt, scale_rule)
    codes = np.moveaxis(codes.reshape(moved.shape), -1, dim)
    bits = np.moveaxis(bits.reshape(*lead, nblocks), -1, dim)
    return codes, bits


def ref_dequantize(
    codes: np.ndarray, bits: np.ndarray, fmt: ElemFormat | str, *, block_size: int = 32, dim=-1
) -> np.ndarray:
    """float64 values code * 2^(bits - 127); NaN where the scale bits are 255."""
    fmt = as_format(fmt)
    b = np.asarray(bits).astype(np.int64)
    scale = np.where(b == E8M0_NAN, np.nan, np.ldexp(1.0, b - E8M0_BIAS))
    scale = np.repeat(scale, block_size, axis=dim)
    return ref_decode(codes, fmt) * scale
