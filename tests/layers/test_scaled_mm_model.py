"""The Blackwell ``scaled_mm`` backend on CPU, with a model of ``torch._scaled_mm`` in place
of the real one: its operands (FP8 data, swizzled E8M0 scales, token padding) and outputs
against the emulated backend, for the three GEMMs of an MX layer."""

from __future__ import annotations

import pytest
import torch

from mxfp8.layers.gemm import EmulatedBackend, MXSpec, ScaledMMBackend
from mxfp8.layers.scale_layout import from_blocked_scales, to_blocked_scales
from mxfp8.layers.scaled_mm_model import scaled_mm_model
from mxfp8.numerics.quantize import quantize


def _spec(fmt: str = "e4m3") -> MXSpec:
    return MXSpec(fmt, 32, "rceil")


def _gemms(m: int, k: int, n: int):
    """(name, a_hp, b_hp) of fprop, dgrad and wgrad in NT form (reduction last)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / 8).to(torch.bfloat16)
    dy = (torch.randn(m, n, generator=g) / 4).to(torch.bfloat16)
    return [("fprop", x, w), ("dgrad", dy, w.t()), ("wgrad", dy.t(), x.t())]


@pytest.mark.parametrize("m", [64, 40])  # 40 tokens: wgrad's reduction needs padding
def test_scaled_mm_backend_with_the_model_matches_the_emulated_backend(m):
    k, n = 96, 64
    blackwell = ScaledMMBackend(scaled_mm_model, require_sm100=False)
    emulated = EmulatedBackend()
    for name, a_hp, b_hp in _gemms(m, k, n):
        spec = _spec("e5m2" if name != "fprop" else "e4m3")
        a, qa = blackwell.quantize_mx(a_hp, spec, torch.bfloat16, want_q=True)
        b, _ = blackwell.quantize_mx(b_hp, _spec(), torch.bfloat16)
        # operands: row-major FP8 with the reduction padded to whole blocks, their scales
        red = a_hp.shape[1]
        assert a.data.shape == (a_hp.shape[0], -(-red // 32) * 32), name
        assert a.scale.shape == (a_hp.shape[0], -(-red // 32)), name
        ref = quantize(a_hp.contiguous(), spec.fmt, dim=1, pad=True)
        assert torch.equal(a.data[:, :red].view(torch.uint8), ref.data.view(torch.uint8)), name
        assert not a.data[:, red:].view(torch.uint8).any()  # the padding is zeros
        assert torch.equal(a.scale.view(torch.uint8), ref.scale.view(torch.uint8)), name
        # the swizzle the backend hands over undoes to the same scales
        flat = to_blocked_scales(a.scale)
        assert torch.equal(from_blocked_scales(flat, *a.scale.shape), a.scale)
        got = blackwell.mm_nt(a, b, torch.float32)
        ea, _ = emulated.quantize_mx(a_hp, spec, torch.float32)
        eb, _ = emulated.quantize_mx(b_hp, _spec(), torch.float32)
        want = emulated.mm_nt(ea, eb, torch.float32)
        exact = ea.double() @ eb.double().t()
        bound = red * 2.0**-24 * (ea.double().abs() @ eb.double().abs().t())
        assert (got.double() - exact).abs().le(bound).all(), name
        assert (want.double() - exact).abs().le(bound).all(), name


def test_the_model_refuses_a_ragged_reduction():
    a = torch.zeros(32, 40, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="one K, a multiple of 32"):
        scaled_mm_model(a, a.t(), torch.zeros(1), torch.zeros(1), torch.float32)
