"""fake_quantize_rowcol: the shared row+column kernel equals two fake_quantize calls bit for bit.

The oracle is the independent reference quantizer (:mod:`mxfp8.numerics.reference`, numpy
float64 from the spec): both the compiled kernel and the eager fallback (two plain
``fake_quantize`` calls) must equal its dequantized values bit for bit. The compiled kernel
is what the MX linear layer uses for x and dy, so it is checked on every bf16 bit pattern
laid out as a 256x256 matrix (row and column blocks then mix magnitudes, zeros, subnormals,
NaN and Inf differently), and on random shapes and dtypes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics_helpers import assert_same_bits

from mxfp8 import E4M3, E5M2, fake_quantize
from mxfp8.numerics.reference import ref_dequantize, ref_quantize
from mxfp8.numerics.rowcol import fake_quantize_rowcol


def _sweep_matrices() -> dict[str, torch.Tensor]:
    """All 65,536 bf16 patterns as 256x256 matrices, in three arrangements."""
    allp = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    perm = torch.randperm(1 << 16, generator=torch.Generator().manual_seed(1))
    shuffled = allp[perm].reshape(256, 256)
    finite = torch.where(shuffled.isfinite(), shuffled, torch.zeros((), dtype=torch.bfloat16))
    return {
        "ordered": allp.reshape(256, 256).contiguous(),  # row blocks: similar magnitudes
        "shuffled": shuffled.contiguous(),  # NaN/Inf scattered into many blocks
        "finite": finite.contiguous(),  # no NaN/Inf: every block's scale matters
    }


def _reference(x: torch.Tensor, fmt, rule: str, dim: int, dtype=None) -> torch.Tensor:
    """The reference quantizer's values along ``dim``, in ``dtype`` (default x's).

    float64 -> fp32 is exact (at most 4 significant bits), except that near the top of the
    fp32 range a block max may round up to 2^128, which is inf in fp32 (as in the fast
    path); fp32 -> bf16/fp16 is then one RNE cast, like the kernels' final cast."""
    codes, bits = ref_quantize(x.float().numpy(), fmt, scale_rule=rule, dim=dim)
    with np.errstate(over="ignore"):
        values = ref_dequantize(codes, bits, fmt, dim=dim).astype(np.float32)
    return torch.from_numpy(values).to(x.dtype if dtype is None else dtype)


def _check(x: torch.Tensor, fmt, rule: str, compiled: bool = True, out=None) -> None:
    row, col = fake_quantize_rowcol(x, fmt, scale_rule=rule, compiled=compiled, out=out)
    assert_same_bits(row, _reference(x, fmt, rule, dim=-1))
    assert_same_bits(col, _reference(x, fmt, rule, dim=0))
    if out is not None:
        assert row is out[0] and col is out[1]


def test_rowcol_bf16_sweep_default_recipe():
    """E4M3 / rceil (the mxfp8 recipe) on every bf16 pattern, compiled."""
    for x in _sweep_matrices().values():
        _check(x, E4M3, "rceil")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["E4M3", "E5M2"])
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_rowcol_bf16_sweep_matrix(fmt, rule):
    for x in _sweep_matrices().values():
        _check(x, fmt, rule)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fmt=st.sampled_from([E4M3, E5M2]),
    seed=st.integers(0, 2**16),
    special=st.booleans(),
)
def test_rowcol_random_shapes(rows, cols, dtype, fmt, seed, special):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32 * rows, 32 * cols, generator=g) * torch.exp2(
        torch.randint(-20, 20, (32 * rows, 1), generator=g).float()
    )
    if special:  # a NaN, an Inf, a zero block and an fp32 subnormal in random places
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (4,), generator=g)
        flat[idx[0]], flat[idx[1]], flat[idx[3]] = float("nan"), float("-inf"), 1e-40
        x[:32, :32] = 0
    _check(x.to(dtype), fmt, "rceil")


def _specials(seed: int) -> torch.Tensor:
    """64x96, magnitudes over 2^+-20 per row, a NaN, an Inf, a zero block, a subnormal and a
    block max with mantissa above 1.75 (floor saturates it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 96, generator=g) * torch.exp2(
        torch.randint(-20, 20, (64, 1), generator=g).float()
    )
    x[0, 3], x[40, 50], x[7, 7] = float("nan"), float("-inf"), 1e-40
    x[32:64, :32] = 0
    x[20, 70] = 1.9 * x[20].abs().max()
    return x


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["E4M3", "E5M2"])
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_rowcol_eager_fallback_matches_the_reference(fmt, rule):
    """``compiled=False``: two fake_quantize calls, against the reference, not themselves."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _check(_specials(0).to(dtype), fmt, rule, compiled=False)
    _check(_sweep_matrices()["shuffled"], fmt, rule, compiled=False)  # every bf16 pattern
    x = _specials(1)
    _check(x, fmt, rule, compiled=False, out=(torch.empty_like(x), torch.empty_like(x)))


def test_rowcol_rejects_unaligned_shapes():
    with pytest.raises(ValueError, match="multiples of block_size"):
        fake_quantize_rowcol(torch.zeros(48, 64))
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize_rowcol(torch.zeros(2, 32, 32))


def test_rowcol_fp32_input_bf16_output():
    """The layer's case under autocast: an fp32 x, bf16 operands; equals fake_quantize + cast."""
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 1e-38
    row, col = fake_quantize_rowcol(x, compiled=True, out_dtype=torch.bfloat16)
    assert row.dtype == col.dtype == torch.bfloat16
    assert_same_bits(row, fake_quantize(x, dim=-1).bfloat16())
    assert_same_bits(col, fake_quantize(x, dim=0).bfloat16())
    assert_same_bits(row, _reference(x, E4M3, "rceil", dim=-1, dtype=torch.bfloat16))
