"""Per-operand quantization statistics against hand-built cases and a float64 oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mxfp8.numerics.formats import E4M3, E5M2
from mxfp8.numerics.quantize import quantize
from mxfp8.numerics.tensorwise import quantize_tensorwise
from mxfp8.stats.operand_stats import (
    SQNR_CAP_DB,
    clip_threshold,
    finalize,
    mx_dequantize,
    mx_stats,
    operand_stats,
    tensorwise_stats,
)


def _stats(hp, q):
    return finalize(operand_stats(hp, q))


def test_clip_threshold_is_the_rounding_midpoint_above_max():
    assert clip_threshold(E4M3) == 464.0
    assert clip_threshold(E5M2) == 61440.0
    # the midpoint itself rounds to the max (ties to even); just above it would not
    assert float(torch.tensor(464.0).to(torch.float8_e4m3fn).float()) == 448.0


def test_floor_clips_a_large_mantissa_and_rceil_does_not():
    x = torch.full((2, 32), 0.5)
    x[0, 0] = 1.9  # floor: e = 0 - 8, 1.9 * 256 = 486.4 > 464: clipped
    x[1, 0] = 1.8  # 1.8 * 256 = 460.8: rounds to 448 anyway, not counted
    floor = _stats(x, quantize(x, E4M3, scale_rule="floor"))
    rceil = _stats(x, quantize(x, E4M3, scale_rule="rceil"))
    assert floor["saturated_pct"] == pytest.approx(100 / 64, rel=1e-6)
    assert rceil["saturated_pct"] == 0.0


def test_underflow_counts_nonzero_values_flushed_to_zero():
    x = torch.zeros(1, 64)
    x[0, 0] = 448.0  # block scale 2^0: smallest E4M3 subnormal is 2^-9
    x[0, 1] = 2.0**-12  # flushed
    x[0, 2] = 2.0**-8  # kept (a subnormal)
    x[0, 32] = 1.0  # second block: only this value and zeros
    s = _stats(x, quantize(x, E4M3))
    assert s["underflow_pct"] == pytest.approx(100 / 4, rel=1e-6)  # 1 of 4 non-zeros
    assert s["scale_exp_hist"] == {"0": 1, "-8": 1}  # 448 -> 2^0; 1.0 -> 2^ceil(log2(1/448))


def _oracle(x: np.ndarray, exps: np.ndarray, deq: np.ndarray, fmt, block: int):
    """float64, one block at a time along the last dim."""
    sat = under = nonzero = 0
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // block):
            e = int(exps[r, b])
            for v in x[r, b * block : (b + 1) * block]:
                sat += abs(v) / 2.0**e > clip_threshold(fmt)
    nonzero = np.count_nonzero(x)
    under = np.count_nonzero((x != 0) & (deq == 0))
    sqnr = 10 * math.log10((x**2).sum() / ((x - deq) ** 2).sum())
    return 100 * sat / x.size, 100 * under / nonzero, sqnr


@pytest.mark.parametrize("rule", ["floor", "rceil"])
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_mx_stats_match_a_float64_oracle(rule, fmt):
    g = torch.Generator().manual_seed(3)
    # heavy-tailed values over a wide range, so every statistic is exercised
    x = torch.randn(8, 256, generator=g) * torch.exp(4 * torch.randn(8, 256, generator=g))
    q = quantize(x, fmt, scale_rule=rule)
    s = _stats(x, q)
    sat, under, sqnr = _oracle(
        x.double().numpy(), q.scale_exponent().numpy(), q.dequantize().double().numpy(), fmt, 32
    )
    assert s["saturated_pct"] == pytest.approx(sat, rel=1e-5, abs=1e-9)
    assert s["underflow_pct"] == pytest.approx(under, rel=1e-5, abs=1e-9)
    assert s["sqnr_db"] == pytest.approx(sqnr, abs=1e-3)
    assert s["amax"] == pytest.approx(float(x.abs().max()), rel=1e-5)
    assert sum(s["scale_exp_hist"].values()) == 8 * 256 // 32
    if rule == "rceil":
        assert s["saturated_pct"] == 0.0
    if rule == "floor":
        assert s["saturated_pct"] > 0  # this data has blocks with amax mantissa > 1.75


def test_sqnr_of_gaussian_data_is_near_the_documented_value():
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    s = _stats(x, quantize(x, E4M3))
    assert 30.5 < s["sqnr_db"] < 32.5  # reference notes: about 31.5 dB for E4M3 rceil


def test_transposed_operand_is_matched_to_its_quantized_layout():
    """Layers pass wgrad operands as x.T while the backend quantizes x along dim 0."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    q = quantize(x, E4M3, dim=0)  # blocks down the columns of x == along the rows of x.T
    direct = _stats(x, q)
    via_t = _stats(x.t(), q)  # square: both orientations fit the shape
    assert via_t == direct and direct["sqnr_db"] > 28


def test_zero_error_and_all_zero_tensors_are_json_safe():
    exact = torch.tensor([[1.0, 2.0, 0.5, -4.0] * 8])
    assert _stats(exact, quantize(exact, E4M3))["sqnr_db"] == SQNR_CAP_DB
    zeros = torch.zeros(2, 32)
    s = _stats(zeros, quantize(zeros, E4M3))
    assert s["sqnr_db"] is None and s["underflow_pct"] == 0.0
    json.dumps(s, allow_nan=False)


def test_nan_block_is_counted_and_not_called_saturated():
    x = torch.ones(2, 32)
    x[0, 3] = float("nan")
    s = _stats(x, quantize(x, E4M3))
    assert s["nonfinite_pct"] == pytest.approx(100 / 64)
    assert s["saturated_pct"] == 0.0
    assert s["scale_exp_hist"]["128"] == 1  # E8M0 NaN scale
    json.dumps(s, allow_nan=False)


def test_tensorwise_saturation_with_a_stale_delayed_scale():
    x = torch.linspace(-1, 1, 1000)
    x[0] = 10.0  # an outlier the history has not seen
    q = quantize_tensorwise(x, E4M3, scale=torch.tensor(448.0))  # scale from amax 1
    s = finalize(tensorwise_stats(x, q))
    expected = int((x.abs() * 448 > 464).sum())
    assert expected >= 1
    assert s["saturated_pct"] == pytest.approx(100 * expected / 1000)
    assert s["scale"] == 448.0 and "scale_exp_hist" not in s
    current = finalize(tensorwise_stats(x, quantize_tensorwise(x, E4M3)))
    assert current["saturated_pct"] == 0.0  # current scaling: amax lands exactly on the max


def test_mx_stats_of_a_padded_tensor():
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(2))
    q = quantize(x, E4M3, pad=True)
    s = finalize(mx_stats(x, q))
    assert sum(s["scale_exp_hist"].values()) == 4 * 2


def test_unknown_quantized_object_is_rejected():
    with pytest.raises(TypeError, match="MXTensor or TensorwiseFP8"):
        operand_stats(torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("dim", [0, 1])
def test_fast_dequantize_is_bit_exact(fmt, dim):
    """mx_dequantize against the numerics core's dequantize, atol=0, NaN blocks included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 96, generator=g) * torch.exp(8 * torch.randn(64, 96, generator=g))
    x[5, 7] = float("nan")
    x[9, :] = 0.0
    x[:, 11] = 0.0
    q = quantize(x, fmt, dim=dim)
    ours, ref = mx_dequantize(q), q.dequantize(torch.float32)
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    assert torch.equal(ours.view(torch.int32)[~ref.isnan()], ref.view(torch.int32)[~ref.isnan()])
