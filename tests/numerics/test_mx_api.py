"""The public MX API: shapes, dims, dtypes, padding, errors, the compiled path."""

from __future__ import annotations

import pytest
import torch
from numerics_helpers import assert_codes_equal, assert_same_bits, assert_scale_bits_equal

from mxfp8 import E4M3, E5M2, MXTensor, ScaleRule, dequantize, fake_quantize, quantize
from mxfp8.numerics.reference import ref_quantize


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 10).to(dtype)


def test_fields_and_shapes():
    x = _randn(4, 6, 64)
    t = quantize(x, "e5m2", block_size=16, dim=2, scale_rule="floor")
    assert isinstance(t, MXTensor)
    assert t.data.dtype == torch.float8_e5m2 and t.data.shape == x.shape
    assert t.scale.dtype == torch.float8_e8m0fnu and t.scale.shape == (4, 6, 4)
    assert (t.fmt, t.block_size, t.dim, t.scale_rule) == (E5M2, 16, 2, ScaleRule.FLOOR)
    assert t.scale_exponent().dtype == torch.int32
    assert torch.equal(t.scale_exponent(), t.scale.view(torch.uint8).int() - 127)
    assert torch.equal(dequantize(t), t.dequantize())
    assert t.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_any_dim_matches_reference(dim):
    x = _randn(32, 64, 96)
    t = quantize(x, E4M3, dim=dim)
    codes, bits = ref_quantize(x.numpy(), E4M3, dim=dim)
    assert_codes_equal(t.data, codes, E4M3)
    assert_scale_bits_equal(t.scale, bits)
    assert t.dim == dim % 3
    assert_same_bits(fake_quantize(x, dim=dim), t.dequantize())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    x = _randn(8, 64, dtype=dtype)
    t = quantize(x)
    codes, bits = ref_quantize(x.float().numpy(), E4M3)
    assert_codes_equal(t.data, codes, E4M3)
    assert_scale_bits_equal(t.scale, bits)
    out = fake_quantize(x)
    assert out.dtype == dtype
    assert_same_bits(out, t.dequantize(dtype))


def test_non_contiguous_input():
    base = _randn(64, 128)
    x = base.t()  # (128, 64), non-contiguous
    assert not x.is_contiguous()
    t = quantize(x, dim=1)
    ref = quantize(x.contiguous(), dim=1)
    assert torch.equal(t.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(t.scale.view(torch.uint8), ref.scale.view(torch.uint8))
    assert_same_bits(
        fake_quantize(x[:, ::2], block_size=8), fake_quantize(x[:, ::2].clone(), block_size=8)
    )


def test_input_is_not_modified():
    x = _randn(4, 64)
    before = x.clone()
    fake_quantize(x, scale_rule="floor")
    quantize(x, "e5m2", scale_rule="floor")
    assert torch.equal(x, before)


def test_empty_inputs():
    for shape, dim in [((0, 64), -1), ((4, 0), -1), ((0, 32), 0), ((2, 0, 32), 1)]:
        x = torch.empty(shape)
        t = quantize(x, dim=dim)
        assert t.data.shape == x.shape and t.data.numel() == 0
        assert t.dequantize().shape == x.shape
        assert fake_quantize(x, dim=dim).shape == x.shape


def test_size_not_multiple_of_block_raises_with_details():
    with pytest.raises(ValueError, match=r"size 40 along dim 1 .*block_size 32"):
        quantize(torch.zeros(3, 40))
    with pytest.raises(ValueError, match="size 40"):
        fake_quantize(torch.zeros(40, 3), dim=0)


def test_pad_zero_pads_the_last_block():
    x = _randn(3, 40)
    t = quantize(x, pad=True)
    assert t.data.shape == (3, 40) and t.scale.shape == (3, 2)
    padded = torch.cat([x, torch.zeros(3, 24)], dim=1)
    full = quantize(padded)
    assert torch.equal(t.scale.view(torch.uint8), full.scale.view(torch.uint8))
    assert torch.equal(t.data.view(torch.uint8), full.data.view(torch.uint8)[:, :40])
    assert_same_bits(t.dequantize(), full.dequantize()[:, :40])
    assert_same_bits(fake_quantize(x, pad=True), t.dequantize())
    # along a leading dim too
    y = _randn(40, 3)
    assert_same_bits(quantize(y, dim=0, pad=True).dequantize(), fake_quantize(y, dim=0, pad=True))


def test_bad_arguments():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize(torch.arange(32))
    with pytest.raises(TypeError, match="float64"):
        fake_quantize(torch.zeros(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="block_size"):
        quantize(torch.zeros(32), block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        quantize(torch.zeros(32), block_size=2.0)
    with pytest.raises(IndexError):
        quantize(torch.zeros(32), dim=1)
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale rule"):
        quantize(torch.zeros(32), scale_rule="round")


def test_mxtensor_validates():
    t = quantize(_randn(2, 64))
    with pytest.raises(ValueError, match="scale shape"):
        MXTensor(t.data, t.scale[:, :1], E4M3, 32, 1, ScaleRule.RCEIL)
    with pytest.raises(TypeError):
        MXTensor(t.data, t.scale, E5M2, 32, 1, ScaleRule.RCEIL)


def test_block_size_one_and_odd_sizes():
    x = _randn(5, 21)
    for bs in (1, 3, 7, 21):
        t = quantize(x, block_size=bs)
        codes, bits = ref_quantize(x.numpy(), E4M3, block_size=bs)
        assert_codes_equal(t.data, codes, E4M3)
        assert_scale_bits_equal(t.scale, bits)


def test_compiled_fake_quantize_is_bit_identical():
    """One compile in the fast suite; the full matrix is in the slow test below."""
    x = _randn(64, 256)
    x[0, 3], x[1, 40], x[2, :32] = float("nan"), float("-inf"), 0.0
    assert_same_bits(fake_quantize(x, compiled=True), fake_quantize(x))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matrix_is_bit_identical(fmt, rule, dtype):
    x = _randn(64, 256, dtype=dtype, seed=1) * torch.exp2(torch.randint(-20, 20, (64, 1)))
    x = x.to(dtype)
    x[0, 3], x[1, 40], x[2, :32] = float("nan"), float("-inf"), 0.0
    for dim in (0, 1):
        eager = quantize(x, fmt, scale_rule=rule, dim=dim)
        comp = quantize(x, fmt, scale_rule=rule, dim=dim, compiled=True)
        assert torch.equal(eager.data.view(torch.uint8), comp.data.view(torch.uint8))
        assert torch.equal(eager.scale.view(torch.uint8), comp.scale.view(torch.uint8))
        got = fake_quantize(x, fmt, scale_rule=rule, dim=dim, compiled=True)
        assert_same_bits(got, fake_quantize(x, fmt, scale_rule=rule, dim=dim))


def test_out_buffers_are_written_and_returned():
    x = _randn(64, 64)
    want = quantize(x, "e5m2", dim=0, scale_rule="floor")
    buf = quantize(torch.zeros(64, 64), "e5m2", dim=0, scale_rule="floor")
    got = quantize(x, "e5m2", dim=0, scale_rule="floor", out=buf)
    assert got.data.data_ptr() == buf.data.data_ptr()
    assert got.scale.data_ptr() == buf.scale.data_ptr()
    assert torch.equal(buf.data.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(buf.scale.view(torch.uint8), want.scale.view(torch.uint8))
    out = torch.empty_like(x)
    assert fake_quantize(x, out=out) is out
    assert_same_bits(out, fake_quantize(x))
    y = _randn(4, 40)  # padded: computed, then copied into the buffer
    out = torch.empty_like(y)
    assert_same_bits(fake_quantize(y, pad=True, out=out), fake_quantize(y, pad=True))
    with pytest.raises(ValueError, match="out"):
        fake_quantize(x, out=torch.empty(64, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out.scale"):
        quantize(x, out=quantize(torch.zeros(64, 64), block_size=16))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_compiled_out_buffers(fmt, rule):
    x = _randn(64, 128, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    fake_quantize(x, fmt, scale_rule=rule, compiled=True, out=out)
    assert_same_bits(out, fake_quantize(x, fmt, scale_rule=rule))
    buf = quantize(torch.zeros(64, 128), fmt, scale_rule=rule, dim=0)
    quantize(x, fmt, scale_rule=rule, dim=0, compiled=True, out=buf)
    want = quantize(x, fmt, scale_rule=rule, dim=0)
    assert torch.equal(buf.data.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(buf.scale.view(torch.uint8), want.scale.view(torch.uint8))


def test_inside_a_callers_torch_compile():
    """Called from code the caller compiles, the fused kernel is traced into their graph."""
    x = _randn(32, 64, dtype=torch.bfloat16)
    x[0, 0] = float("inf")

    @torch.compile(fullgraph=True)
    def step(a: torch.Tensor) -> torch.Tensor:
        return fake_quantize(a, scale_rule="floor", dim=0) * 2

    assert_same_bits(step(x), fake_quantize(x, scale_rule="floor", dim=0) * 2)
