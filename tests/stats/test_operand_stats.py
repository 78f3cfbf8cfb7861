"""Per-operand quantization statistics against hand-built cases and a float64 oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mxfp8.cli.quantize_stats import tensor_report
from mxfp8.numerics.formats import E4M3, E5M2
from mxfp8.numerics.metrics import mx_quant_stats, saturation_bound
from mxfp8.numerics.quantize import quantize
from mxfp8.numerics.tensorwise import quantize_tensorwise
from mxfp8.stats.operand_stats import (
    SQNR_CAP_DB,
    finalize,
    mx_dequantize,
    mx_stats,
    operand_stats,
    tensorwise_stats,
)


def _stats(hp, q):
    return finalize(operand_stats(hp, q))


def _clamp_changes(scaled: float, fmt) -> bool:
    """By hand: does round-half-to-even onto the element grid, with no top exponent, land
    above the max? (That is when the saturating clamp changes the value.)"""
    a = abs(scaled)
    if not a > 0:
        return False
    ex = max(math.floor(math.log2(a)), fmt.emin)
    quantum = 2.0 ** (ex - fmt.man_bits)
    return round(a / quantum) * quantum > fmt.max_finite  # Python's round: half to even


def test_saturation_bound_is_where_the_clamp_starts_to_change_values():
    assert saturation_bound(E4M3) == 464.0  # 464 ties to the even 448: not clipped
    assert float(torch.tensor(464.0).to(torch.float8_e4m3fn).float()) == 448.0
    # E5M2: 61440 ties to the even 65536 (inf without the clamp): clipped; the bound is the
    # fp32 number just below it
    assert saturation_bound(E5M2) == float(np.nextafter(np.float32(61440), np.float32(0)))
    assert float(torch.tensor(61440.0).to(torch.float8_e5m2).float()) == math.inf
    for fmt in (E4M3, E5M2):
        bound = np.float32(saturation_bound(fmt))
        above = float(np.nextafter(bound, np.float32(np.inf)))
        assert not _clamp_changes(float(bound), fmt) and _clamp_changes(above, fmt)


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
                sat += _clamp_changes(abs(v) / 2.0**e, fmt)
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
    with pytest.raises(TypeError, match="expected MXTensor, TensorwiseFP8"):
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


def _digits(v: float, n: int) -> float:
    """Telemetry's JSON rounding: n significant digits (6, and 5 for SQNR)."""
    return float(f"{v:.{n}g}")


def _both(x: torch.Tensor, fmt: str, rule: str) -> tuple[dict, dict]:
    """(quantize-stats' entry, telemetry's row) for the same tensor, format and rule."""
    cli = {(s["fmt"], s["rule"]): s for s in tensor_report(x, 32, -1)["stats"]}[fmt, rule]
    assert cli == mx_quant_stats(x, fmt, rule).to_dict()  # the CLI's numbers are the metric's
    tele = finalize(mx_stats(x, quantize(x, fmt, scale_rule=rule)))
    return cli, tele


def test_quantize_stats_and_telemetry_agree_on_saturation_and_sqnr():
    """Regression: metrics.py (quantize-stats) counted |x| > 448 * 2^e as saturated while
    telemetry counted > 464 * 2^e; values scaled into (448, 464] round to 448 anyway."""
    x = torch.zeros(1, 96)
    # floor, block amax 1.8125 -> e = -8: scaled 456 and 464 (ties to 448): not clipped
    x[0, :4] = torch.tensor([1.78125, 1.8125, 1.0, 0.5])
    # block amax 1.9375 -> e = -8: scaled 480 and 496 clipped to 448, 456 not clipped
    x[0, 32:36] = torch.tensor([1.875, 1.9375, 1.78125, -1.0])
    x[0, 64:66] = torch.tensor([0.75, -0.25])  # e = -9: 384 and -128, exact
    # by hand: every value is k/32, and the floor rule's dequantized values are
    #   1.78125 -> 1.75, 1.8125 -> 1.75, 1.875 -> 1.75 (clamp), 1.9375 -> 1.75 (clamp)
    errors = [1.78125 - 1.75, 1.8125 - 1.75, 1.875 - 1.75, 1.9375 - 1.75, 1.78125 - 1.75]
    values = [1.78125, 1.8125, 1.0, 0.5, 1.875, 1.9375, 1.78125, -1.0, 0.75, -0.25]
    floor_sqnr = 10 * math.log10(sum(v * v for v in values) / sum(e * e for e in errors))
    cli, tele = _both(x, "e4m3", "floor")
    assert cli["saturated_pct"] == 100 * 2 / 96  # 480 and 496; the old 448 rule said 5
    assert tele["saturated_pct"] == _digits(cli["saturated_pct"], 6)
    assert cli["sqnr_db"] == pytest.approx(floor_sqnr, rel=1e-12)
    assert tele["sqnr_db"] == _digits(cli["sqnr_db"], 5)
    # rceil: block amax 1.8125 and 1.9375 get e = -7 (scaled 232, 248), nothing clips
    cli, tele = _both(x, "e4m3", "rceil")
    assert cli["saturated_pct"] == tele["saturated_pct"] == 0.0
    assert tele["sqnr_db"] == _digits(cli["sqnr_db"], 5)


def test_e5m2_midpoint_above_max_counts_as_saturated_everywhere():
    """61440 = 57344 + half a step ties to the even 65536 (inf), so the clamp changes it;
    telemetry used to require > 61440 and missed it."""
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 1.875, 1.0  # floor: e = 0 - 15, scaled 61440 -> 57344 by the clamp
    q = quantize(x, E5M2, scale_rule="floor")
    assert float(q.dequantize()[0, 0]) == 1.75
    cli, tele = _both(x, "e5m2", "floor")
    assert cli["saturated_pct"] == 100 / 32 and tele["saturated_pct"] == _digits(100 / 32, 6)


def test_exact_zero_and_nan_conventions_are_the_same_in_both():
    exact = torch.tensor([[1.0, 2.0, 0.5, -4.0] * 8])
    zeros = torch.zeros(2, 32)
    nan = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    nan[0, 3] = float("nan")  # poisons its block; SQNR is over the other blocks' elements
    for fmt in ("e4m3", "e5m2"):
        for rule in ("rceil", "floor"):
            assert [s["sqnr_db"] for s in _both(exact, fmt, rule)] == [SQNR_CAP_DB] * 2
            assert [s["sqnr_db"] for s in _both(zeros, fmt, rule)] == [None, None]
            cli, tele = _both(nan, fmt, rule)
            assert math.isfinite(cli["sqnr_db"])
            assert tele["sqnr_db"] == _digits(cli["sqnr_db"], 5)
            json.dumps([cli, tele], allow_nan=False)
