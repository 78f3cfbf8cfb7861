"""Triton MX kernels: one read of a 2-D tensor -> both MX copies, and the dequantize.

An optional backend (``pip install mxfp8[gpu]``): this module imports ``triton``, and the
package imports this module only when the Triton kernels are asked for;
:func:`mxfp8.numerics.backends.triton_available` says whether they can run. On CPU the
kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is
first imported), which is how the tests check them bit for bit against the reference
quantizer.

Why only integer arithmetic. Every FP8 code and E8M0 scale is computed from the fp32 *bits*
of the input, with integer shifts, adds and compares: no float multiply, no float-to-FP8
cast, no inline PTX. So the result depends neither on the interpreter's FP8 casts (which
have had rounding bugs: triton issue 8322, PRs 9808 and 11897) nor on a GPU's flush-to-zero
or FMA contraction, and it is the same on the interpreter and on any GPU.

The encoding of one element. Write |x| = M * 2^(E - 23) with the 24-bit significand M
(the implicit bit included; fp32 subnormals have E = -126 and no implicit bit). The block
scale is 2^e (:func:`mxfp8.numerics.backends.eager.e8m0_bits`, the same integer formula), so the
scaled value is M * 2^(E - e - 23). With E' = E - e, the FP8 code is

    k = 23 - man + max(emin - E', 0)            (bits to drop: more below the normal range)
    n = RNE(M >> k)                             (round half to even, on integers)
    code = (max(E' - emin, 0) << man) + n       (a carry of n into the exponent is exact)

then saturated to the largest finite code (what the floor rule's clamp does; rceil never
needs it), and the sign bit. A block holding Inf/NaN gets scale bits 255 and NaN codes
(0x7F), as :func:`~mxfp8.numerics.backends.eager.quantize_blocks` gives.

Layouts (the same as :func:`mxfp8.numerics.quantize.quantize`): for x [R, C], the row copy
(blocks along dim 1) has codes [R, C] and scales [R, ceil(C/32)]; the column copy (blocks
along dim 0) has codes [R, C] and scales [ceil(R/32), C]. A partial last block is padded
with zeros for its amax, as the reference pads it. One program handles a 32 x 32 tile:
32 row blocks and 32 column blocks, from one load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxfp8.numerics.formats import ElemFormat, ScaleRule
from mxfp8.numerics.tensor import MXTensor

TILE = 32  # the MX block size this backend supports


def _constants(fmt: ElemFormat, rule: ScaleRule) -> dict[str, int]:
    # the largest finite code: 0x7E = 448 for E4M3 (no Inf; 0x7F is its NaN), and
    # 0x7B = 57344 for E5M2 (exponent field 30, mantissa 3; field 31 holds Inf and NaN)
    max_code = 0x7E if fmt.name == "e4m3" else ((fmt.emax + fmt.bias) << fmt.man_bits) | 3
    rceil = ScaleRule(rule) is ScaleRule.RCEIL
    return {
        "MAN": fmt.man_bits,
        "EMIN": fmt.emin,
        "EMAX": fmt.emax,
        "MAX_CODE": max_code,
        "RCEIL_ADD": (0x7FFFFF - fmt.max_mantissa_bits) if rceil else 0,
    }


@triton.jit
def _scale_bits(amax_bits, RCEIL_ADD: tl.constexpr, EMAX: tl.constexpr):
    """E8M0 bits (int32) and the non-finite mask of blocks with these |amax| bits."""
    b = tl.minimum(amax_bits, 0x7F800000)
    nonfinite = b == 0x7F800000
    eb = ((b + RCEIL_ADD) >> 23) - EMAX
    eb = tl.minimum(tl.maximum(eb, 0), 254)
    return eb, nonfinite


@triton.jit
def _encode(bits, scale_e, MAN: tl.constexpr, EMIN: tl.constexpr, MAX_CODE: tl.constexpr):
    """FP8 codes (int32, 0..255) of fp32 ``bits`` scaled by 2^scale_e (see module doc)."""
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    field = a >> 23
    mant = a & 0x7FFFFF
    # fp32 subnormals (bf16 ones too) are normalized with integer shifts: a binary
    # search for the leading one, so that sig always has bit 23 set (0 stays 0)
    sig = tl.where(field == 0, mant, mant | 0x800000)
    lz = tl.zeros_like(sig)
    for sh in tl.static_range(5):
        step = 16 >> sh
        low = (sig != 0) & (sig < (1 << (24 - step)))
        sig = tl.where(low, sig << step, sig)
        lz = tl.where(low, lz + step, lz)
    e = tl.where(field == 0, -126, field - 127) - lz - scale_e
    k = 23 - MAN + tl.maximum(EMIN - e, 0)
    k = tl.minimum(k, 30)  # >= 25 already rounds every 24-bit significand to 0
    half = (1 << (k - 1)) - 1
    n = (sig + half + ((sig >> k) & 1)) >> k
    code = (tl.maximum(e - EMIN, 0) << MAN) + n
    code = tl.where(a == 0, 0, tl.minimum(code, MAX_CODE))
    return code | (sign << 7)


@triton.jit
def _tile(R, C, T: tl.constexpr):
    """This program's T x T tile of an [R, C] matrix: its grid position, row and column
    indices, and the mask of the elements inside the matrix."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * T + tl.arange(0, T)
    cols = pid_c * T + tl.arange(0, T)
    return pid_r, pid_c, rows, cols, (rows[:, None] < R) & (cols[None, :] < C)


@triton.jit
def quantize_rowcol_kernel(
    x_ptr, row_q_ptr, row_s_ptr, col_q_ptr, col_s_ptr,
    R, C, stride_r, stride_c, n_row_blocks, n_col_blocks,
    MAN: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, MAX_CODE: tl.constexpr,
    RCEIL_ADD: tl.constexpr, ROW: tl.constexpr, COL: tl.constexpr, T: tl.constexpr,
    BF16_BITS: tl.constexpr,
):  # fmt: skip
    pid_r, pid_c, rows, cols, mask = _tile(R, C, T)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask,
                other=0)  # fmt: skip
    if BF16_BITS:  # bf16 given as its int16 bits: the fp32 bits are the same 16, shifted
        bits = (x.to(tl.int32) & 0xFFFF) << 16
    else:  # fp32 (a bit cast) or fp16 (its widening to fp32 is exact)
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    absb = bits & 0x7FFFFFFF  # integer max of |x| bits = float max; NaN bits are largest
    out_off = rows[:, None] * C + cols[None, :]
    if ROW:  # blocks along dim 1: one scale per row of the tile
        eb, bad = _scale_bits(tl.max(absb, axis=1), RCEIL_ADD, EMAX)
        code = _encode(bits, eb[:, None] - 127, MAN, EMIN, MAX_CODE)
        code = tl.where(bad[:, None], 0x7F, code)
        tl.store(row_q_ptr + out_off, code.to(tl.uint8), mask=mask)
        s = tl.where(bad, 255, eb).to(tl.uint8)
        tl.store(row_s_ptr + rows * n_col_blocks + pid_c, s, mask=rows < R)
    if COL:  # blocks along dim 0: one scale per column of the tile
        eb, bad = _scale_bits(tl.max(absb, axis=0), RCEIL_ADD, EMAX)
        code = _encode(bits, eb[None, :] - 127, MAN, EMIN, MAX_CODE)
        code = tl.where(bad[None, :], 0x7F, code)
        tl.store(col_q_ptr + out_off, code.to(tl.uint8), mask=mask)
        s = tl.where(bad, 255, eb).to(tl.uint8)
        tl.store(col_s_ptr + pid_r * C + cols, s, mask=cols < C)


@triton.jit
def decode_fp8(c, MAN: tl.constexpr, BIAS: tl.constexpr, E4M3: tl.constexpr):
    """FP8 codes (int32, 0..255) -> their fp32 values, built from the bits: normal numbers
    rebias the exponent, subnormals are mantissa * 2^(1 - BIAS - MAN) (an exact product of
    small integers and a power of two); NaN and Inf as the formats define them."""
    sign = (c >> 7) & 1
    ef = (c >> MAN) & ((1 << (7 - MAN)) - 1)
    mf = c & ((1 << MAN) - 1)
    normal = (((ef - BIAS + 127) << 23) | (mf << (23 - MAN))).to(tl.float32, bitcast=True)
    sub = mf.to(tl.float32) * (1.0 / (1 << (BIAS - 1 + MAN)))
    v = tl.where(ef == 0, sub, normal)
    if E4M3:  # no Inf; S.1111.111 is NaN
        nan = (c & 0x7F) == 0x7F
    else:  # exponent field 31: Inf (mantissa 0) or NaN
        nan = (ef == 0x1F) & (mf != 0)
        v = tl.where((ef == 0x1F) & (mf == 0), float("inf"), v)
    v = tl.where(sign == 1, -v, v)
    return tl.where(nan, float("nan"), v)


@triton.jit
def e8m0_to_float(sb):
    """E8M0 bits (int32) -> 2^(sb - 127) in fp32 (2^-127 is an fp32 subnormal), NaN for 255."""
    scale = tl.where(sb == 0, 0x00400000, sb << 23).to(tl.float32, bitcast=True)
    return tl.where(sb == 255, float("nan"), scale)


@triton.jit
def dequantize_kernel(
    q_ptr, s_ptr, out_ptr, R, C, s_stride_r, s_stride_c,
    MAN: tl.constexpr, BIAS: tl.constexpr, E4M3: tl.constexpr, DIM: tl.constexpr,
    T: tl.constexpr,
):  # fmt: skip
    pid_r, pid_c, rows, cols, mask = _tile(R, C, T)
    off = rows[:, None] * C + cols[None, :]
    c = tl.load(q_ptr + off, mask=mask, other=0).to(tl.int32)
    if DIM == 1:
        sb = tl.load(s_ptr + rows * s_stride_r + pid_c * s_stride_c, mask=rows < R, other=0)
        sb = sb.to(tl.int32)[:, None]
    else:
        sb = tl.load(s_ptr + pid_r * s_stride_r + cols * s_stride_c, mask=cols < C, other=0)
        sb = sb.to(tl.int32)[None, :]
    v = decode_fp8(c, MAN, BIAS, E4M3)
    tl.store(out_ptr + off, v * e8m0_to_float(sb), mask=mask)


def _check(x: torch.Tensor, block_size: int) -> None:
    if block_size != TILE:
        raise ValueError(f"the Triton MX kernels support block_size {TILE}, got {block_size}")
    if x.dim() != 2:
        raise ValueError(f"the Triton MX kernels take 2-D tensors, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton MX kernels take fp32/bf16/fp16 input, got {x.dtype}")


def quantize_rowcol(x: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, *, block_size: int = 32,
                    row: bool = True, col: bool = True):  # fmt: skip
    """Both MX copies of 2-D ``x`` from one read: ``(row, col)`` where each is
    ``(codes uint8 [R, C], scale bits uint8)`` or None when not asked for; the row copy's
    scales are [R, ceil(C/32)] (blocks along dim 1), the column copy's [ceil(R/32), C]."""
    _check(x, block_size)
    R, C = x.shape
    nr, nc = -(-R // TILE), -(-C // TILE)
    dev = x.device
    row_q = torch.empty((R, C), dtype=torch.uint8, device=dev) if row else None
    row_s = torch.empty((R, nc), dtype=torch.uint8, device=dev) if row else None
    col_q = torch.empty((R, C), dtype=torch.uint8, device=dev) if col else None
    col_s = torch.empty((nr, C), dtype=torch.uint8, device=dev) if col else None
    dummy = torch.empty(1, dtype=torch.uint8, device=dev)
    if R and C:
        # bf16 goes in as its bits: the interpreter's bf16 -> fp32 conversion loses bf16
        # subnormals, and integer bits need no conversion at all
        bf16 = x.dtype == torch.bfloat16
        quantize_rowcol_kernel[(nr, nc)](
            x.view(torch.int16) if bf16 else x, row_q if row else dummy,
            row_s if row else dummy, col_q if col else dummy,
            col_s if col else dummy, R, C, x.stride(0), x.stride(1), nr, nc,
            ROW=row, COL=col, T=TILE, BF16_BITS=bf16, **_constants(fmt, rule),
        )  # fmt: skip
    return ((row_q, row_s) if row else None), ((col_q, col_s) if col else None)


def quantize(x: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, *, block_size: int = 32,
             dim: int = 1) -> MXTensor:  # fmt: skip
    """The MXTensor of ``mxfp8.quantize(x, fmt, dim=dim, pad=True)`` for 2-D ``x``, blocks
    along dim 1 (the row copy) or dim 0 (the column copy)."""
    row, col = quantize_rowcol(x, fmt, rule, block_size=block_size, row=dim == 1, col=dim == 0)
    codes, bits = row if dim == 1 else col
    return MXTensor(codes.view(fmt.torch_dtype), bits.view(torch.float8_e8m0fnu), fmt,
                    block_size, dim, rule)  # fmt: skip


def dequantize(codes: torch.Tensor, scale_bits: torch.Tensor, fmt: ElemFormat, dim: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """Codes [R, C] (uint8) times their E8M0 scales (uint8; blocks along ``dim``) in fp32,
    then cast to ``dtype`` by torch (one RNE)."""
    codes = codes.contiguous()
    R, C = codes.shape
    out = torch.empty((R, C), dtype=torch.float32, device=codes.device)
    if R and C:
        grid = (-(-R // TILE), -(-C // TILE))
        dequantize_kernel[grid](
            codes, scale_bits, out, R, C, scale_bits.stride(0), scale_bits.stride(1),
            MAN=fmt.man_bits, BIAS=fmt.bias, E4M3=fmt.name == "e4m3", DIM=1 if dim else 0,
            T=TILE,
        )  # fmt: skip
    return out if dtype == torch.float32 else out.to(dtype)


__all__ = ["TILE", "dequantize", "quantize", "quantize_rowcol"]
