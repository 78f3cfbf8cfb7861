"""fake_quantize_rowcol: the shared row+column kernel equals two fake_quantize calls bit for bit.

The eager ``fake_quantize`` along ``dim=-1`` and ``dim=0`` is the oracle here (it is itself
checked against the reference on every bf16 pattern in test_bf16_sweep.py). The compiled
kernel is what the MX linear layer uses for x and dy, so it is checked on every bf16 bit
pattern laid out as a 256x256 matrix (row and column blocks then mix magnitudes, zeros,
subnormals, NaN and Inf differently), and on random shapes and dtypes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics_helpers import assert_same_bits

from mxfp8 import E4M3, E5M2, fake_quantize
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


def _check(x: torch.Tensor, fmt, rule: str, compiled: bool = True) -> None:
    row, col = fake_quantize_rowcol(x, fmt, scale_rule=rule, compiled=compiled)
    assert_same_bits(row, fake_quantize(x, fmt, scale_rule=rule, dim=-1))
    assert_same_bits(col, fake_quantize(x, fmt, scale_rule=rule, dim=0))


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


def test_rowcol_eager_fallback_and_out_buffers():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    out = (torch.empty_like(x), torch.empty_like(x))
    got = fake_quantize_rowcol(x, E5M2, scale_rule="floor", out=out)
    assert got[0] is out[0] and got[1] is out[1]
    _check(x, E5M2, "floor", compiled=False)


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
