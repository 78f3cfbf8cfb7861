"""The Triton MX GEMM (FP8 codes + E8M0 scales in, dequantized in registers, bf16 MMA, fp32
accumulation) on CPU through Triton's interpreter, against the exact product of the same
dequantized operands: within the fp32 accumulation bound K * 2^-24 * (|A| @ |B|^T), the
bound the emulated backend's matmul also meets."""

from __future__ import annotations

import pytest
import torch

from mxfp8.numerics.backends import triton_available
from mxfp8.numerics.quantize import quantize

# triton is a dev extra: a missing one fails here (tests/test_dev_extras.py), never skips
assert triton_available(), "triton is not installed: make install (the dev extras)"


def _operand(rows: int, k: int, fmt: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 3, k)[None, :]
    return quantize(x.to(torch.bfloat16), fmt, dim=1)


@pytest.mark.parametrize(("fmts", "shape"), [
    (("e4m3", "e4m3"), (40, 48, 64)),  # partial tiles in M and N
    (("e5m2", "e4m3"), (32, 64, 96)),  # dgrad: dy in E5M2
])  # fmt: skip
def test_mx_gemm_is_within_the_fp32_bound_of_the_exact_product(fmts, shape):
    from mxfp8.layers.gemm import EmulatedBackend
    from mxfp8.numerics.backends.triton_mm import mx_mm_nt

    m, n, k = shape
    a, b = _operand(m, k, fmts[0], 1), _operand(n, k, fmts[1], 2)
    got = mx_mm_nt(a.data.view(torch.uint8), a.scale.view(torch.uint8),
                   b.data.view(torch.uint8), b.scale.view(torch.uint8), a.fmt, b.fmt)  # fmt: skip
    da, db = a.dequantize(torch.float64), b.dequantize(torch.float64)
    exact = da @ db.t()
    bound = k * 2.0**-24 * (da.abs() @ db.abs().t())
    assert (got.double() - exact).abs().le(bound).all()
    # the emulated backend (bf16 operands, bf16 matmul with fp32 accumulation, output
    # rounded to bf16) meets the same bound plus its output rounding (half a bf16 ulp)
    emu = EmulatedBackend().mm_nt(a.dequantize(torch.bfloat16), b.dequantize(torch.bfloat16),
                                  torch.float32)  # fmt: skip
    assert (emu.double() - exact).abs().le(bound + exact.abs() * 2.0**-8).all()


def test_a_nan_block_makes_its_rows_nan_and_shapes_are_checked():
    from mxfp8.numerics.backends.triton_mm import mx_mm_nt

    x = torch.randn(32, 64)
    x[3, 40] = float("nan")
    a, b = quantize(x, "e4m3", dim=1), _operand(32, 64, "e4m3", 3)
    got = mx_mm_nt(a.data.view(torch.uint8), a.scale.view(torch.uint8),
                   b.data.view(torch.uint8), b.scale.view(torch.uint8), a.fmt, b.fmt)  # fmt: skip
    assert got[3].isnan().all() and not got[[0, 1, 2, 4]].isnan().any()
    with pytest.raises(ValueError, match="one K, a multiple of 32"):
        mx_mm_nt(a.data.view(torch.uint8), a.scale.view(torch.uint8),
                 b.data.view(torch.uint8)[:, :32], b.scale.view(torch.uint8)[:, :1], a.fmt,
                 b.fmt)  # fmt: skip
