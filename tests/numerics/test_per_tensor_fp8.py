"""Per-tensor FP8: current scaling and the DelayedScaling amax tracker."""

from __future__ import annotations

import math

import pytest
import torch

from mxfp8 import E4M3, E5M2, DelayedScaling, TensorwiseFP8, quantize_tensorwise
from mxfp8.numerics.tensorwise import AmaxReduce


def test_current_scaling_maps_amax_to_dest_max():
    x = torch.tensor([0.5, -3.0, 1.25, 2.0])
    for fmt in (E4M3, E5M2):
        q = quantize_tensorwise(x, fmt)
        assert isinstance(q, TensorwiseFP8) and q.data.dtype == fmt.torch_dtype
        assert q.scale.dtype == torch.float32 and q.scale.dim() == 0
        assert q.scale.item() == pytest.approx(fmt.max_finite / 3.0, rel=1e-7)
        assert q.amax.item() == 3.0
        assert q.data.float()[1].item() == -fmt.max_finite  # amax lands on dest_max
        deq = q.dequantize()
        assert torch.allclose(deq, x, rtol=2.0**-fmt.man_bits)
        assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
        assert q.scale_inv.item() == pytest.approx(3.0 / fmt.max_finite, rel=1e-7)


def test_matches_an_explicit_cast():
    """data is exactly RNE(x * scale) with saturation, for bf16 input computed in fp32."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q = quantize_tensorwise(x, E4M3, scale=37.5)
    want = (x.float() * 37.5).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.data.view(torch.uint8), want.view(torch.uint8))


def test_given_scale_saturates_both_formats():
    x = torch.tensor([1.0, -1.0, 1e6])
    for fmt in (E4M3, E5M2):
        q = quantize_tensorwise(x, fmt, scale=torch.tensor(1e6))
        assert q.data.float().tolist() == [fmt.max_finite, -fmt.max_finite, fmt.max_finite]


def test_zero_and_non_finite_tensors():
    q = quantize_tensorwise(torch.zeros(8), E4M3)
    assert q.scale.item() == 1.0 and (q.data.float() == 0).all()
    x = torch.tensor([1.0, float("inf"), -2.0, float("nan"), -float("inf")])
    for fmt in (E4M3, E5M2):
        q = quantize_tensorwise(x, fmt)
        assert q.scale.item() == 1.0 and not math.isfinite(q.amax.item())
        out = q.dequantize()
        assert out[0].item() == 1.0 and out[2].item() == -2.0
        assert out[[1, 3, 4]].isnan().all()  # never a finite number
    assert quantize_tensorwise(torch.empty(0), E4M3).data.numel() == 0
    with pytest.raises(TypeError):
        quantize_tensorwise(torch.zeros(3, dtype=torch.int32), E4M3)


def test_tiny_amax_gives_a_finite_scale():
    q = quantize_tensorwise(torch.tensor([1e-45, 0.0]), E4M3)
    assert math.isfinite(q.scale.item())


def test_delayed_scaling_max():
    d = DelayedScaling(E4M3, history_len=3)
    assert d.scale().item() == 1.0 and d.amax_history.numel() == 0  # empty history
    for a in (1.0, 4.0, 2.0, 0.5):
        d.update(a)
    assert d.amax_history.tolist() == [0.5, 2.0, 4.0]  # most recent first, 1.0 fell out
    assert d.scale().item() == pytest.approx(448.0 / 4.0)
    d.update(float("nan"))
    assert d.skipped == 1 and d.count == 4


def test_delayed_scaling_ema():
    d = DelayedScaling("e5m2", history_len=2, reduce="ema", ema_decay=0.5)
    assert d.reduce is AmaxReduce.EMA
    for a in (8.0, 4.0, 2.0):
        d.update(torch.tensor(a))
    assert d.reduced_amax().item() == pytest.approx(0.5 * (0.5 * 8 + 0.5 * 4) + 0.5 * 2)
    assert d.scale().item() == pytest.approx(57344.0 / 4.0)


def test_delayed_quantize_uses_history_and_records():
    d = DelayedScaling(E4M3, history_len=4)
    q1 = d.quantize(torch.tensor([2.0, -1.0]))  # first step: current scaling
    assert q1.scale.item() == pytest.approx(224.0)
    q2 = d.quantize(torch.tensor([8.0, 1.0]))  # outlier: old scale, so 8 saturates
    assert q2.scale.item() == pytest.approx(224.0)
    assert q2.data.float()[0].item() == 448.0
    assert d.amax_history.tolist() == [8.0, 2.0]
    assert d.scale().item() == pytest.approx(56.0)


def test_state_dict_round_trip():
    d = DelayedScaling(E4M3, history_len=4, reduce="ema", ema_decay=0.75)
    for a in (3.0, 5.0):
        d.update(a)
    e = DelayedScaling(E4M3, history_len=4, reduce="ema", ema_decay=0.75)
    e.load_state_dict(d.state_dict())
    assert torch.equal(e.amax_history, d.amax_history) and e.scale().item() == d.scale().item()
    with pytest.raises(ValueError, match="mismatch"):
        DelayedScaling(E4M3, history_len=8).load_state_dict(d.state_dict())


def test_delayed_scaling_rejects_bad_config():
    with pytest.raises(ValueError):
        DelayedScaling(E4M3, history_len=0)
    with pytest.raises(ValueError):
        DelayedScaling(E4M3, ema_decay=1.0)
    with pytest.raises(ValueError):
        DelayedScaling(E4M3, reduce="mean")
