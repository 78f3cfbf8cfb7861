"""The ``cpu`` kernel (``compiled=True`` on CPU): block scales in one compiled pass, elements in
another; and the shared passes that make a 2-D tensor's row and column copies together.

Why two passes instead of one fused loop. Inductor's single-loop kernel for a block layout
``(outer, block_size, inner)`` is compute-bound on CPU, for two reasons measured on the
project's machine (docs/performance.md):

- with ``inner > 1`` (blocks along a leading dim: the wgrad operands) it recomputes the
  scale from the amax for every element, and its vectorized float<->int bit casts go
  through a scalar loop over a stack buffer;
- with ``inner == 1`` (blocks along the last dim) each block of 32 pays two horizontal
  reductions (``amax`` and ``amin``) and a store of both to scratch buffers.

Here pass 1 reduces ``|x|`` (one reduction) to per-block fp32 factors (or E8M0 bits), which
are 1/block_size of the data, and pass 2 is purely elementwise: it loads those factors as
plain floats, so nothing is bit-cast per element. The second read of x costs less than the
work it removes (measured 1.2-3.3x faster at 8192x8192, most for the column copies).

``quantize`` casts to FP8 in pass 2 (exact: see :func:`quant_apply`).

The pass functions are meant to run under ``torch.compile`` (each pass is one loop); the
drivers at the end (:func:`quantize`, :func:`fake_quantize`, the ``*_rowcol`` functions) run
them through :func:`mxfp8.numerics.backends.inductor.compiled` into caller-given buffers.

Row and column copies. A linear layer needs each of x and dy quantized twice: along its last
dim (fprop, dgrad) and along its first dim (wgrad). Viewing x [M, K] as 32x32 tiles,
(M/bs, bs, K/bs, bs), both block families are reductions of the same view: a row block is a
tile row (reduce dim 3), a column block a tile column (reduce dim 1). So one pass computes
both sets of scales and a second writes both outputs: x is read twice instead of four times.
Each element goes through exactly the per-block arithmetic of the one-copy passes, hence the
results are bit-equal to two separate calls (tested on every bf16 pattern).
"""

from __future__ import annotations

import torch

from mxfp8.numerics.backends.eager import (
    e8m0_bits,
    inverse_scale_float,
    round_to_grid,
    scale_float,
)
from mxfp8.numerics.backends.inductor import compiled
from mxfp8.numerics.formats import E8M0_NAN, ElemFormat, ScaleRule


def _abs_amax(xb: torch.Tensor) -> torch.Tensor:
    """max |x| over each block (dim 1), fp32, NaN-propagating: one reduction."""
    return xb.abs().amax(dim=1, keepdim=True).float()  # exact: bf16/fp16 -> fp32


def fake_scales(xb: torch.Tensor, fmt: ElemFormat, rule: ScaleRule):
    """Pass 1 of fake_quantize: (2^-e, 2^e or NaN), fp32, each (outer, 1, inner)."""
    return scales_from_amax(_abs_amax(xb), fmt, rule)


def scales_from_amax(amax: torch.Tensor, fmt: ElemFormat, rule: ScaleRule):
    """(2^-e, 2^e or NaN for non-finite blocks), fp32, from the fp32 block amax."""
    ebits, nonfinite = e8m0_bits(amax, fmt, rule)
    return inverse_scale_float(ebits), scale_float(ebits, nonfinite)


def _scaled(xb: torch.Tensor, inv: torch.Tensor, fmt: ElemFormat, rule: ScaleRule):
    y = xb * inv  # exact: a power-of-two product (fp32 by type promotion)
    if rule == ScaleRule.FLOOR:  # floor may overshoot max_finite
        y = y.clamp(-fmt.max_finite, fmt.max_finite)
    return y


def fake_apply(xb, inv, scale, fmt: ElemFormat, rule: ScaleRule, out: torch.Tensor) -> None:
    """Pass 2 of fake_quantize: ``out`` (x's dtype and block shape) = MX-rounded x."""
    out.copy_((round_to_grid(_scaled(xb, inv, fmt, rule), fmt) * scale).to(out.dtype))


def quant_scales(xb: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, bits_out: torch.Tensor):
    """Pass 1 of quantize: writes the E8M0 bits (uint8, (outer, 1, inner)) into
    ``bits_out`` and returns 2^-e (fp32, same shape)."""
    ebits, nonfinite = e8m0_bits(_abs_amax(xb), fmt, rule)
    bits_out.copy_(torch.where(nonfinite, E8M0_NAN, ebits).to(torch.uint8))
    return inverse_scale_float(ebits)


def quant_apply(xb, inv, bits, fmt: ElemFormat, rule: ScaleRule, codes: torch.Tensor) -> None:
    """Pass 2 of quantize: FP8 codes (uint8, x's block shape) into ``codes``; blocks whose
    scale bits are NaN (255) get NaN elements, code 0x7F in both formats.

    The FP8 cast is exact here (RNE on a value already scaled into range; E4M3 saturates,
    and floor's overshoot is clamped first), and in this elementwise pass Inductor
    vectorizes it: measured faster than rounding with fp32 arithmetic and encoding the
    code with integer operations.
    """
    y = torch.where(bits == E8M0_NAN, float("nan"), _scaled(xb, inv, fmt, rule))
    codes.copy_(y.to(fmt.torch_dtype).view(torch.uint8))


# --- row + column passes over the tile view x4 = (M/bs, bs, K/bs, bs) -----------------------


def _rowcol_scales(x4: torch.Tensor, fmt: ElemFormat, rule: ScaleRule):
    """(row inv, row scale, col inv, col scale): per-block fp32 factors of the tile view."""
    a = x4.abs()
    row = scales_from_amax(a.amax(dim=3, keepdim=True).float(), fmt, rule)
    col = scales_from_amax(a.amax(dim=1, keepdim=True).float(), fmt, rule)
    return (*row, *col)


def _rowcol_apply(x4, r_inv, r_scale, c_inv, c_scale, fmt, rule, out_row, out_col) -> None:
    fake_apply(x4, r_inv, r_scale, fmt, rule, out_row)
    fake_apply(x4, c_inv, c_scale, fmt, rule, out_col)


def _bits_and_inv(amax: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, bits_out: torch.Tensor):
    ebits, nonfinite = e8m0_bits(amax, fmt, rule)
    bits_out.copy_(torch.where(nonfinite, E8M0_NAN, ebits).to(torch.uint8))
    return inverse_scale_float(ebits)


def _mixed_scales(x4, fmt: ElemFormat, rule: ScaleRule, col_bits: torch.Tensor):
    """(row inv, row scale, col inv); writes the column blocks' E8M0 bits."""
    a = x4.abs()
    r_inv, r_scale = scales_from_amax(a.amax(dim=3, keepdim=True).float(), fmt, rule)
    c_inv = _bits_and_inv(a.amax(dim=1, keepdim=True).float(), fmt, rule, col_bits)
    return r_inv, r_scale, c_inv


def _mixed_apply(x4, r_inv, r_scale, c_inv, c_bits, fmt, rule, out_row, col_codes) -> None:
    fake_apply(x4, r_inv, r_scale, fmt, rule, out_row)
    quant_apply(x4, c_inv, c_bits, fmt, rule, col_codes)


def _both_scales(x4, fmt: ElemFormat, rule: ScaleRule, row_bits, col_bits):
    a = x4.abs()
    r_inv = _bits_and_inv(a.amax(dim=3, keepdim=True).float(), fmt, rule, row_bits)
    c_inv = _bits_and_inv(a.amax(dim=1, keepdim=True).float(), fmt, rule, col_bits)
    return r_inv, c_inv


def _both_apply(x4, r_inv, r_bits, c_inv, c_bits, fmt, rule, row_codes, col_codes) -> None:
    quant_apply(x4, r_inv, r_bits, fmt, rule, row_codes)
    quant_apply(x4, c_inv, c_bits, fmt, rule, col_codes)


# --- drivers: compiled passes into caller-given buffers -------------------------------------


def quantize(xb: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, codes, bits) -> None:
    """Blocks (outer, bs, inner) -> FP8 codes (uint8, xb's shape) and E8M0 bits (uint8,
    (outer, 1, inner)), written into ``codes`` and ``bits``."""
    inv = compiled(quant_scales, fmt, rule, xb.dtype)(xb, fmt, rule, bits)
    compiled(quant_apply, fmt, rule, xb.dtype)(xb, inv, bits, fmt, rule, codes)


def fake_quantize(xb: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, out) -> None:
    """Blocks (outer, bs, inner) -> their MX-rounded values, written into ``out``."""
    inv, scale = compiled(fake_scales, fmt, rule, xb.dtype)(xb, fmt, rule)
    compiled(fake_apply, fmt, rule, xb.dtype)(xb, inv, scale, fmt, rule, out)


def fake_rowcol(x4: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, out_row, out_col) -> None:
    """Both MX-rounded copies of the tile view, into ``out_row``/``out_col`` (x4's shape)."""
    scales = compiled(_rowcol_scales, fmt, rule, x4.dtype)(x4, fmt, rule)
    compiled(_rowcol_apply, fmt, rule, x4.dtype)(x4, *scales, fmt, rule, out_row, out_col)


def fake_and_quantize_rowcol(x4, fmt: ElemFormat, rule: ScaleRule, out_row, col_codes,
                             col_bits) -> None:  # fmt: skip
    """The row copy MX-rounded into ``out_row``; the column copy as codes and E8M0 bits
    (``col_bits``: (M/bs, 1, K/bs, bs))."""
    r_inv, r_scale, c_inv = compiled(_mixed_scales, fmt, rule, x4.dtype)(x4, fmt, rule, col_bits)
    compiled(_mixed_apply, fmt, rule, x4.dtype)(
        x4, r_inv, r_scale, c_inv, col_bits, fmt, rule, out_row, col_codes
    )


def quantize_rowcol(x4, fmt: ElemFormat, rule: ScaleRule, row_codes, row_bits, col_codes,
                    col_bits) -> None:  # fmt: skip
    """Both copies as codes and E8M0 bits (``row_bits``: (M/bs, bs, K/bs, 1))."""
    r_inv, c_inv = compiled(_both_scales, fmt, rule, x4.dtype)(x4, fmt, rule, row_bits, col_bits)
    compiled(_both_apply, fmt, rule, x4.dtype)(
        x4, r_inv, row_bits, c_inv, col_bits, fmt, rule, row_codes, col_codes
    )
