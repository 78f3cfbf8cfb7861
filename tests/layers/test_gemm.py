"""GEMM backends: cuBLAS block-scale layout, backend selection errors, emulated exactness."""

from __future__ import annotations

import pytest
import torch

from mxfp8.layers.gemm import (
    BackendUnavailableError,
    EmulatedBackend,
    MXSpec,
    ScaledMMBackend,
    blocked_scale_offset,
    from_blocked_scales,
    select_backend,
    to_blocked_scales,
)


def test_offset_oracle_matches_documented_examples():
    # cuBLAS/nvmath documentation example: a 128x128 operand with 16-element blocks has an
    # 128x8 scale matrix; scale (5, 2) sits at byte 82 and scale (5, 5) at byte 593.
    assert blocked_scale_offset(5, 2, 8) == 82
    assert blocked_scale_offset(5, 5, 8) == 593
    # rows 0, 32, 64, 96 of a tile share one 16-byte line
    assert [blocked_scale_offset(r, 0, 4) for r in (0, 32, 64, 96, 1)] == [0, 4, 8, 12, 16]
    assert blocked_scale_offset(128, 0, 4) == 512  # next row tile


@pytest.mark.parametrize("rows, cols", [(128, 4), (256, 8), (200, 6), (1, 1), (130, 33)])
def test_to_blocked_matches_scalar_oracle(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    s = torch.randint(1, 255, (rows, cols), dtype=torch.uint8, generator=g)
    flat = to_blocked_scales(s)
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    assert flat.shape == (pr * pc,)
    expected = torch.zeros(pr * pc, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            expected[blocked_scale_offset(r, c, cols)] = s[r, c]
    assert torch.equal(flat, expected)  # padding bytes are zero, every scale in its place
    assert torch.equal(from_blocked_scales(flat, rows, cols), s)


def test_to_blocked_keeps_e8m0_dtype():
    s = torch.randint(0, 255, (128, 4), dtype=torch.uint8).view(torch.float8_e8m0fnu)
    flat = to_blocked_scales(s)
    assert flat.dtype == torch.float8_e8m0fnu
    assert torch.equal(from_blocked_scales(flat, 128, 4).view(torch.uint8), s.view(torch.uint8))


def test_scaled_mm_off_sm100_raises_clear_error():
    with pytest.raises(BackendUnavailableError, match="SM100.*Use backend='emulated'"):
        select_backend("scaled_mm", torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="device type 'cpu'"):
        ScaledMMBackend().quantize_mx(
            torch.zeros(4, 32), MXSpec("e4m3", 32, "rceil"), torch.float32
        )
    assert select_backend("auto", torch.device("cpu")).name == "emulated"
    assert select_backend("emulated", torch.device("cpu")).name == "emulated"


def _exact_sum_operands(m, n, k, seed):
    """Operands whose dot products are exact in fp32 in any order.

    Entries are +-(8..15) * 2^-3 * 2^e with e in {-1, 0}: 4 significant bits, so products are
    multiples of 2^-8 below 4; a sum of k <= 256 of them stays below 2^10, i.e. 18 bits.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(r, c):
        mant = torch.randint(8, 16, (r, c), generator=g).float() / 8
        sign = torch.randint(0, 2, (r, c), generator=g).float() * 2 - 1
        e = torch.randint(-1, 1, (r, c), generator=g).float()
        return sign * mant * torch.exp2(e)

    return draw(m, k), draw(n, k)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_emulated_mm_is_exact_fp32_accumulation(out_dtype):
    """On data where every partial sum is exact in fp32, the emulated GEMM (bf16 matmul for bf16
    output) equals the exact result (fp64) rounded once to the output dtype: no bf16 partial
    sums, whatever the blocking of the matmul library."""
    a, b = _exact_sum_operands(64, 48, 256, 0)
    be = EmulatedBackend()
    spec = MXSpec("e4m3", 32, "rceil")
    qa, _ = be.quantize_mx(a, spec, out_dtype)
    qb, _ = be.quantize_mx(b, spec, out_dtype)
    assert torch.equal(qa.float(), a) and torch.equal(qb.float(), b)  # on the E4M3 grid already
    out = be.mm_nt(qa, qb, out_dtype)
    exact = (a.double() @ b.double().t()).to(out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, exact)


def test_emulated_transposed_view_quantizes_along_source_dim0():
    x = torch.randn(64, 96)
    x[3, 5] = 1e4  # an outlier: its block along dim 0 differs from its block along dim 1
    be = EmulatedBackend()
    spec = MXSpec("e4m3", 32, "rceil")
    got, q = be.quantize_mx(x.t(), spec, torch.float32, want_q=True)
    from mxfp8.numerics.quantize import quantize

    ref = quantize(x.t().contiguous(), "e4m3", dim=-1).dequantize(torch.float32)
    assert torch.equal(got, ref)
    assert torch.equal(q.dequantize(torch.float32).t(), ref)
    fast, _ = be.quantize_mx(x.t(), spec, torch.float32)
    assert torch.equal(fast, ref)
