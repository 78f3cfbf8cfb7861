"""Per-row FP8 (current scaling per slice): quantize_rowwise against explicit computations."""

from __future__ import annotations

import math

import pytest
import torch

from mxfp8 import E4M3, E5M2, quantize_tensorwise
from mxfp8.numerics.rowwise import RowwiseFP8, quantize_rowwise


def _data(seed: int, dtype=torch.float32) -> torch.Tensor:
    """[12, 40]: rows and columns of very different magnitudes, and the special rows."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-20, 8, (12, 40), generator=g).float())
    x = torch.randn(12, 40, generator=g) * mag
    x[2] = 0.0  # an all-zero row: scale 1
    x[5, 3] = float("inf")  # non-finite rows: scale 1, those elements NaN
    x[7, 9] = float("nan")
    x[9] = torch.randn(40, generator=g) * 1e-42  # fp32 subnormals: the scale is capped
    return x.to(dtype)


def _explicit_row(row: torch.Tensor, fmt) -> tuple[torch.Tensor, float]:
    """One 1-D slice, element by element: amax, scale = max / amax (1 for 0 or non-finite),
    capped at the largest fp32, then RNE(x * scale) saturated, NaN for non-finite x.

    ``max / amax`` as ``current_scale`` evaluates it: torch computes a Python number over a
    tensor as ``amax.reciprocal() * max``, two fp32 roundings (at times one ulp from the
    correctly rounded quotient; quantize and dequantize use the same scale, so no harm)."""
    vals = [float(v) for v in row.float()]
    amax = max((abs(v) if not math.isnan(v) else math.inf for v in vals), default=0.0)
    if math.isfinite(amax) and amax > 0:
        f32 = torch.float32
        recip = torch.tensor(1.0, dtype=f32) / torch.tensor(amax, dtype=f32)
        scale = float(recip * torch.tensor(fmt.max_finite, dtype=f32))
        scale = min(scale, torch.finfo(f32).max)
    else:
        scale = 1.0
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append(float("nan"))
            continue
        s = float(torch.tensor(v, dtype=torch.float32) * torch.tensor(scale))  # fp32 product
        out.append(max(-fmt.max_finite, min(fmt.max_finite, s)))
    return torch.tensor(out, dtype=torch.float32).to(fmt.torch_dtype), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dim", [0, 1])
def test_equals_an_explicit_per_slice_computation(dim, fmt, dtype):
    x = _data(0, dtype)
    q = quantize_rowwise(x, fmt, dim)
    assert isinstance(q, RowwiseFP8) and q.dim == dim and q.fmt is fmt
    assert q.data.dtype == fmt.torch_dtype and q.data.shape == x.shape
    keep = [1, 1]
    keep[1 - dim] = x.shape[1 - dim]
    assert q.scale.shape == tuple(keep) and q.scale.dtype == torch.float32
    for i in range(x.shape[1 - dim]):
        sl = x.select(1 - dim, i)
        want, scale = _explicit_row(sl, fmt)
        got = q.data.select(1 - dim, i)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), i
        assert q.scale.reshape(-1)[i].item() == scale, i
        # the same slice through the per-tensor quantizer: the same codes and scale
        t = quantize_tensorwise(sl, fmt)
        assert torch.equal(got.view(torch.uint8), t.data.view(torch.uint8)), i
        assert torch.equal(q.scale.reshape(-1)[i], t.scale), i
        assert torch.equal(q.amax.reshape(-1)[i], t.amax) or t.amax.isnan(), i


def test_rows_are_independent_and_reach_dest_max():
    """An outlier row changes no other row; every finite non-zero row's amax maps to max."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=g)
    base = quantize_rowwise(x, E4M3, dim=1)
    x[4] *= 1e6
    out = quantize_rowwise(x, E4M3, dim=1)
    others = [i for i in range(16) if i != 4]
    assert torch.equal(base.data[others].view(torch.uint8), out.data[others].view(torch.uint8))
    assert out.data.float().abs().amax(dim=1).tolist() == [448.0] * 16
    # along columns the outlier row sets every column's scale: the other rows lose precision
    cols = quantize_rowwise(x, E4M3, dim=0)
    err_rows = (cols.dequantize() - x)[others].abs().sum()
    assert err_rows > 10 * (out.dequantize() - x)[others].abs().sum()


def test_dequantize_and_error_bound():
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(2)) * 3
    for dim in (0, 1, -1):
        q = quantize_rowwise(x, E4M3, dim)
        deq = q.dequantize()
        assert torch.equal(deq, q.data.float() / q.scale)
        assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
        assert torch.equal(q.scale_inv, q.scale.reciprocal())
        amax = x.abs().amax(dim=dim, keepdim=True)
        # normal range: half an ulp of 3 mantissa bits; below it, half the subnormal step
        bound = torch.maximum(x.abs() * 2.0**-4, amax / 448 * 2.0**-10)
        assert ((deq - x).abs() <= bound * (1 + 1e-6)).all()
    assert quantize_rowwise(x, E4M3, -1).dim == 1


def test_non_finite_and_degenerate_inputs():
    x = torch.tensor([[1.0, float("inf"), -2.0], [0.5, -0.25, 4.0]])
    q = quantize_rowwise(x, E5M2, dim=1)
    out = q.dequantize()
    assert q.scale[0].item() == 1.0 and out[0, 1].isnan() and out[0, 0].item() == 1.0
    assert q.scale[1].item() == 57344.0 / 4.0 and torch.isfinite(out[1]).all()
    e = quantize_rowwise(torch.empty(0, 5), E4M3, dim=0)
    assert e.data.shape == (0, 5) and e.scale.shape == (1, 5) and (e.scale == 1).all()
    v = quantize_rowwise(torch.tensor([3.0, -1.5]), E4M3)  # 1-D: one slice
    assert v.scale.shape == (1,) and v.data.float().tolist() == [448.0, -224.0]
    with pytest.raises(TypeError):
        quantize_rowwise(torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError):
        quantize_rowwise(torch.tensor(1.0))
