"""CPU fast path for ``compiled=True``: block scales in one compiled pass, elements in another.

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

Every function here is meant to run under ``torch.compile`` (each pass is one loop).
"""

from __future__ import annotations

import torch

from mxfp8.numerics.formats import E8M0_NAN, ElemFormat, ScaleRule
from mxfp8.numerics.kernels import e8m0_bits, inverse_scale_float, round_to_grid, scale_float


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
