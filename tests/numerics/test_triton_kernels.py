"""The Triton MX kernels, bit for bit against the in-package reference (numpy oracle), run on
CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).

Default suite: small shapes, every special block (zeros, signed zeros, bf16/fp32 subnormals,
the largest values, the 1.75 mantissa boundary that separates the scale rules, rounding ties,
NaN and Inf, partial blocks), both copies (blocks along dim 1 and dim 0) from the one-read
kernel, both formats, both rules, fp32/bf16/fp16 inputs, and the dequantize kernel.
``-m slow``: every bf16 bit pattern in four block layouts, for both formats and rules.
"""

from __future__ import annotations

import pytest
import torch

from mxfp8 import E4M3, E5M2
from mxfp8.numerics.backends import Kernel, resolve, triton_available
from mxfp8.numerics.quantize import dequantize, fake_quantize, quantize

# triton is a dev extra: a missing one fails here (tests/test_dev_extras.py), never skips
assert triton_available(), "triton is not installed: make install (the dev extras)"

FORMATS = {"e4m3": E4M3, "e5m2": E5M2}
RULES = ("rceil", "floor")


def _special(dtype: torch.dtype, rows: int = 64, cols: int = 96) -> torch.Tensor:
    """Random magnitudes over 40 binades, with special values planted in chosen blocks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-20, 12, cols)[None, :]
    x[:32, 0:32] = 0.0  # an all-zero row block and column block
    x[1, 1], x[2, 2] = -0.0, -0.0
    tiny = torch.finfo(dtype).tiny
    x[32:40, 0:32] = torch.linspace(-1, 1, 256).reshape(8, 32) * tiny * 0.7  # subnormals
    big = torch.finfo(dtype).max
    x[40, 32:64] = big * torch.linspace(-1, 1, 32)  # near the largest value
    # the 1.75 boundary: amax just below / at / above 1.75 * 2^k decides rceil vs floor
    x[41, 32:35] = torch.tensor([1.75, 1.7578125, 1.7421875]) * 2.0**5
    x[42, 0:32] = torch.arange(32) * 2.0**-3 + 2.0**-5  # E4M3/E5M2 rounding ties
    x[43, 40] = float("nan")  # a NaN block (row) and column
    x[44, 70] = float("inf")
    x[45, 80] = -float("inf")
    return x.to(dtype)


def _same(t, ref) -> None:
    assert t.data.shape == ref.data.shape and t.scale.shape == ref.scale.shape
    assert torch.equal(t.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(t.scale.view(torch.uint8), ref.scale.view(torch.uint8))
    assert (t.dim, t.fmt, t.scale_rule, t.block_size) == (ref.dim, ref.fmt, ref.scale_rule, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_both_copies_equal_the_reference_on_special_blocks(fmt, rule, dtype):
    from mxfp8.numerics.backends import triton_mx

    for shape in ((64, 96), (40, 70)):  # (40, 70): partial blocks along both dims
        x = _special(dtype, *shape) if shape == (64, 96) else _special(dtype)[:40, :70]
        (rq, rs), (cq, cs) = triton_mx.quantize_rowcol(x, FORMATS[fmt], rule)
        for dim, (q, s) in ((1, (rq, rs)), (0, (cq, cs))):
            ref = quantize(x, fmt, dim=dim, scale_rule=rule, pad=True, kernel="reference")
            assert torch.equal(q, ref.data.view(torch.uint8)), (shape, dim)
            assert torch.equal(s, ref.scale.view(torch.uint8)), (shape, dim)
            got = triton_mx.dequantize(q, s, FORMATS[fmt], dim)
            want = ref.dequantize(torch.float32)
            assert torch.equal(got.isnan(), want.isnan())
            assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), (shape, dim)


@pytest.mark.parametrize("dim", [0, 1])
def test_quantize_with_kernel_triton_gives_the_same_mxtensor(dim):
    x = _special(torch.bfloat16)
    t = quantize(x, "e4m3", dim=dim, kernel="triton")
    _same(t, quantize(x, "e4m3", dim=dim))
    _same(t, quantize(x, "e4m3", dim=dim, compiled=True))
    back = dequantize(t, torch.bfloat16, kernel="triton")
    assert torch.equal(back.nan_to_num(0.0), t.dequantize(torch.bfloat16).nan_to_num(0.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fake_quantize_and_two_copy_entries_with_kernel_triton(dtype):
    """The entries the layers call, with ``kernel="triton"``: the same values as the eager
    path, including NaN blocks and (for the stored column copy) a partial token block."""
    from mxfp8.numerics.rowcol import (
        fake_and_quantize_rowcol,
        fake_quantize_rowcol,
        quantize_rowcol,
    )

    def same_values(a, b):
        assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(0.0).view(torch.uint8), b.nan_to_num(0.0).view(torch.uint8))

    x = _special(dtype)
    for dim in (0, 1):
        same_values(fake_quantize(x, dim=dim, kernel="triton"), fake_quantize(x, dim=dim))
    rows, cols = fake_quantize_rowcol(x, out_dtype=torch.bfloat16, kernel="triton")
    same_values(rows, fake_quantize(x, dim=1).to(torch.bfloat16))
    same_values(cols, fake_quantize(x, dim=0).to(torch.bfloat16))
    ragged = x[:40]  # 40 tokens: the stored wgrad copy zero-pads its last block
    row, col = fake_and_quantize_rowcol(ragged, kernel="triton")
    same_values(row, fake_quantize(ragged, dim=1))
    _same(col, quantize(ragged, dim=0, pad=True))
    for t, dim in zip(quantize_rowcol(ragged, kernel="triton"), (1, 0), strict=True):
        _same(t, quantize(ragged, dim=dim, pad=True))


def test_kernel_names_and_errors():
    cpu = torch.device("cpu")
    assert resolve(None, False, cpu) is Kernel.EAGER
    assert resolve(None, True, cpu) is Kernel.CPU
    assert resolve(None, True, torch.device("meta")) is Kernel.INDUCTOR
    assert resolve("triton", False, cpu) is Kernel.TRITON
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        quantize(torch.zeros(32, 32), kernel="fast")
    with pytest.raises(ValueError, match="kernel 'triton' quantizes 2-D tensors"):
        quantize(torch.zeros(2, 32, 32), kernel="triton")
    with pytest.raises(ValueError, match="not a multiple of block_size 32"):
        quantize(torch.zeros(32, 40), kernel="triton")


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_bf16_pattern_in_every_layout(fmt, rule):
    from numerics_helpers import LAYOUTS

    from mxfp8.numerics.backends import triton_mx

    for name, blocks in LAYOUTS.items():  # (2048, 32): each row one block of 32 patterns
        for dim, x in ((1, blocks), (0, blocks.t().contiguous())):
            (rq, rs), (cq, cs) = triton_mx.quantize_rowcol(x, FORMATS[fmt], rule)
            q, s = (rq, rs) if dim == 1 else (cq, cs)
            ref = quantize(x, fmt, dim=dim, scale_rule=rule, kernel="reference")
            assert torch.equal(q, ref.data.view(torch.uint8)), (name, dim)
            assert torch.equal(s, ref.scale.view(torch.uint8)), (name, dim)
