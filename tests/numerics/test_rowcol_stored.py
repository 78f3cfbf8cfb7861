"""The kernels that keep a copy as MX (FP8 codes + E8M0 scales) equal the reference bit for bit.

MX layers store the wgrad copy of x and the cached weight copies as codes and scales
(:func:`fake_and_quantize_rowcol`, :func:`quantize_rowcol`) and dequantize them when used
(``dequantize(compiled=True)``). The oracle is the spec-simple reference quantizer
(:mod:`mxfp8.numerics.reference`): its codes and scale bits, and its dequantized values.
Checked on every bf16 bit pattern (a 256x256 matrix, shuffled: NaN/Inf, zeros, subnormals in
many blocks) for the training recipe's format, both rules, and on a padded token count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics_helpers import assert_same_bits

from mxfp8 import E4M3, E5M2
from mxfp8.numerics.quantize import dequantize
from mxfp8.numerics.reference import ref_dequantize, ref_quantize
from mxfp8.numerics.rowcol import fake_and_quantize_rowcol, quantize_rowcol


def _all_bf16() -> torch.Tensor:
    allp = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    perm = torch.randperm(1 << 16, generator=torch.Generator().manual_seed(3))
    return allp[perm].reshape(256, 256).contiguous()


def _ref(x: torch.Tensor, fmt, rule: str, dim: int):
    """(codes uint8, scale bits uint8, dequantized fp32) of the reference; a size along
    ``dim`` that is not a multiple of 32 is zero-padded first and the padding cut off."""
    a = x.float().numpy()
    n = a.shape[dim]
    widths = [(0, 0)] * a.ndim
    widths[dim] = (0, -n % 32)
    codes, bits = ref_quantize(np.pad(a, widths), fmt, scale_rule=rule, dim=dim)
    with np.errstate(over="ignore"):
        values = ref_dequantize(codes, bits, fmt, dim=dim).astype(np.float32)
    keep = np.arange(n)
    codes, values = np.take(codes, keep, axis=dim), np.take(values, keep, axis=dim)
    return torch.from_numpy(codes), torch.from_numpy(bits), torch.from_numpy(values)


def _same_mx(t, x, fmt, rule, dim):
    codes, bits, values = _ref(x, fmt, rule, dim)
    assert t.dim == (dim % 2)
    assert torch.equal(t.data.view(torch.uint8), codes.to(torch.uint8))
    assert torch.equal(t.scale.view(torch.uint8), bits.to(torch.uint8))
    for dt in (torch.float32, torch.bfloat16):
        assert_same_bits(dequantize(t, dt, compiled=True), values.to(dt))


@pytest.mark.parametrize("rule", ["rceil", pytest.param("floor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("fmt", [E4M3, pytest.param(E5M2, marks=pytest.mark.slow)])
def test_stored_copies_on_every_bf16_pattern(fmt, rule):
    x = _all_bf16()
    row, col = fake_and_quantize_rowcol(x, fmt, scale_rule=rule, compiled=True,
                                        out_dtype=torch.bfloat16)  # fmt: skip
    assert_same_bits(row, _ref(x, fmt, rule, dim=-1)[2].to(torch.bfloat16))
    _same_mx(col, x, fmt, rule, dim=0)
    a, b = quantize_rowcol(x, fmt, scale_rule=rule, compiled=True)
    _same_mx(a, x, fmt, rule, dim=-1)
    _same_mx(b, x, fmt, rule, dim=0)


def test_a_partial_token_block_is_zero_padded_like_the_reference():
    """47 tokens: the fallback path pads the last column block, as the wgrad reduction does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(47, 64, generator=g) * torch.exp2(torch.randint(-20, 10, (47, 64), generator=g))
    row, col = fake_and_quantize_rowcol(x, E4M3, compiled=True, out_dtype=torch.bfloat16)
    assert col.scale.shape == (2, 64)
    _same_mx(col, x, E4M3, "rceil", dim=0)
    assert_same_bits(row, _ref(x, E4M3, "rceil", dim=-1)[2].to(torch.bfloat16))


def test_out_row_buffer_is_written_and_returned():
    x = _all_bf16()[:64, :64].contiguous()
    buf = torch.empty(64, 64, dtype=torch.bfloat16)
    row, _ = fake_and_quantize_rowcol(x, E4M3, compiled=True, out_dtype=torch.bfloat16,
                                      out_row=buf)  # fmt: skip
    assert row is buf
