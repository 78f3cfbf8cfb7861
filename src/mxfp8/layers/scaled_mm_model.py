"""A CPU model of ``torch._scaled_mm`` with MX block scales, for testing the Blackwell
backend where there is no Blackwell GPU.

``torch._scaled_mm(a, b, scale_a, scale_b, out_dtype)`` on SM100 takes FP8 ``a`` [M, K]
(row-major) and ``b`` [K, N] (column-major), and E8M0 scales in cuBLAS's swizzled blocked
layout, one per 32 elements along K of each row of ``a`` and each column of ``b``. The model
undoes the swizzle (:func:`~mxfp8.layers.scale_layout.from_blocked_scales`, the inverse of
what the backend built), multiplies every FP8 value by its block's power of two (exact in
fp32) and runs the product in fp32: the MX tensor-core GEMM up to the order of its fp32
accumulation. With it in place of ``_scaled_mm``, the backend's operands, swizzle and output
are checked on CPU against the emulated backend (tests/layers/test_scaled_mm_model.py).
"""

from __future__ import annotations

import torch

from mxfp8.layers.scale_layout import from_blocked_scales

BLOCK = 32


def _dequantize(data: torch.Tensor, scale_rows: torch.Tensor) -> torch.Tensor:
    """FP8 [rows, K] times its [rows, K/32] E8M0 scales, in fp32 (NaN for scale 255)."""
    bits = scale_rows.view(torch.uint8).to(torch.int32)
    scale = torch.where(bits == 255, torch.nan, torch.ldexp(torch.ones(bits.shape), bits - 127))
    return data.float() * scale.repeat_interleave(BLOCK, dim=1)


def scaled_mm_model(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor,
                    scale_b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """What ``torch._scaled_mm`` computes for MX operands (see the module doc)."""
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2 or k % BLOCK:
        raise ValueError(f"a [M, K] and b [K, N] need one K, a multiple of {BLOCK}: got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")  # fmt: skip
    sa = from_blocked_scales(scale_a, m, k // BLOCK)
    sb = from_blocked_scales(scale_b, n, k // BLOCK)
    av = _dequantize(a, sa)
    bv = _dequantize(b.t(), sb)  # b is column-major: b.t() is row-major [N, K]
    return (av @ bv.t()).to(out_dtype)
