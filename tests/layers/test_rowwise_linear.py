"""MXLinear under the per-row recipes (fp8-rowwise, fp8-rowwise-gw-hp).

Exactness as in ``test_linear_exact.py``: in each configuration one operand of the GEMM under
test is a signed power-of-two permutation matrix. Its row-wise quantization is exact along
either axis (a slice holding one value v = +-2^e gets scale 448 * 2^-e, code +-448, and
dequantizes back to v), so every output element is one product of a dequantized fp32 value
and a power of two, plus exact zeros: exact in float64 and fp32 whatever the summation order.
The dense operand has magnitudes spread over 2^-32..2^4, so slices along rows and along
columns get very different scales and quantizing along the wrong axis changes the result
(checked, so the exact tests cannot pass vacuously). The reference: ``quantize_rowwise`` of
each high-precision operand along the documented axis, dequantized, multiplied in float64,
rounded to fp32 (the layer's accumulator) and then to the output dtype.
"""

from __future__ import annotations

import pytest
import torch
from linear_exact_helpers import S, _dense, _perm, _run

import mxfp8
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe
from mxfp8.numerics.rowwise import RowwiseFP8, quantize_rowwise
from mxfp8.stats.operand_stats import finalize, operand_stats
from mxfp8.stats.telemetry import TelemetryCollector

RECIPES = ["fp8-rowwise", "fp8-rowwise-gw-hp"]
D = torch.float64


def _q(t: torch.Tensor, r, gemm: str, operand: str, dim: int) -> torch.Tensor:
    """Reference operand: quantize the high-precision tensor along ``dim``; as float64."""
    return quantize_rowwise(t, r.fmt(gemm, operand).elem(), dim).dequantize().to(D)


def _ref(x, w, dy, r, dt, axes=(1, 1, 1, 0, 0, 0)):
    """Explicit y, dx, dW; ``axes``: the dims of x, W (fprop), dy, W (dgrad), dy, x (wgrad)."""
    ax, aw, ady, awt, adyt, axt = axes
    y = _q(x, r, "fprop", "input", ax) @ _q(w, r, "fprop", "weight", aw).T
    dx = _q(dy, r, "dgrad", "grad_output", ady) @ _q(w, r, "dgrad", "weight", awt)
    if "wgrad" in r.hp_gemms:  # the unquantized dy^T x in the compute dtype
        dw = dy.to(dt).to(D).T @ x.to(dt).to(D)
    else:
        dw = _q(dy, r, "wgrad", "grad_output", adyt).T @ _q(x, r, "wgrad", "input", axt)
    return [t.float().to(dt).float() for t in (y, dx, dw)]


CONFIGS = {  # name: (x, w, dy); which outputs are exact (one product per element)
    "dense-x-dy": ((lambda: _dense(1), lambda: _perm(2), lambda: _dense(3)), ("y", "dx")),
    "dense-w": ((lambda: _perm(4), lambda: _dense(5), lambda: _perm(6)), ("y", "dx", "dw")),
    "dense-dy-cols": ((lambda: _perm(7), lambda: _perm(8), lambda: _dense(9)), ("y", "dx", "dw")),
    "dense-x-cols": ((lambda: _dense(10), lambda: _perm(11), lambda: _perm(12)), ("y", "dx", "dw")),
}


def _data(config):
    return [f() for f in CONFIGS[config][0]]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", RECIPES)
def test_three_gemms_bit_exact(name, config, autocast):
    r = recipe(name, convert=("*",))
    x, w, dy = _data(config)
    dt = torch.bfloat16 if autocast else torch.float32
    got = dict(zip(("y", "dx", "dw"), _run(x, w, dy, r, autocast), strict=True))
    want = dict(zip(("y", "dx", "dw"), _ref(x, w, dy, r, dt), strict=True))
    assert got["y"].dtype == dt and got["dx"].dtype == got["dw"].dtype == torch.float32
    for key in CONFIGS[config][1]:
        assert torch.equal(got[key].float(), want[key]), f"{key} differs from the explicit one"


def test_axes_and_sources_matter_for_this_data():
    """Guard against a vacuous pass: each output that exercises a dense operand changes when
    that operand is quantized along the other axis, or (for the column copies) from the
    row-quantized tensor instead of the high-precision one, or not at all."""
    r = recipe("fp8-rowwise")
    dt = torch.float32
    flip = {"y": ((0, 0, 1, 0, 0, 0), "x, W"), "dx": ((1, 1, 0, 1, 0, 0), "dy, W"),
            "dw": ((1, 1, 1, 0, 1, 1), "dy, x")}  # fmt: skip
    tested = {"dense-x-dy": ("y", "dx"), "dense-w": ("y", "dx"), "dense-dy-cols": ("dw",),
              "dense-x-cols": ("dw",)}  # fmt: skip
    for config, keys in tested.items():
        x, w, dy = _data(config)
        right = dict(zip(("y", "dx", "dw"), _ref(x, w, dy, r, dt), strict=True))
        for key in keys:
            wrong = dict(zip(("y", "dx", "dw"), _ref(x, w, dy, r, dt, flip[key][0]), strict=True))
            assert not torch.equal(right[key], wrong[key]), (config, key)
    # wgrad's x copy: from x, not from the row-quantized x (as is, or re-quantized)
    x, w, dy = _data("dense-x-cols")
    _, _, dw = _run(x, w, dy, r, autocast=False)
    dyq = _q(dy, r, "wgrad", "grad_output", 0)
    rows = quantize_rowwise(x, r.fprop_input.elem(), 1).dequantize()
    assert torch.equal(dw, (dyq.T @ _q(x, r, "wgrad", "input", 0)).float())
    assert not torch.equal(dw, (dyq.T @ rows.to(D)).float())
    assert not torch.equal(dw, (dyq.T @ _q(rows, r, "wgrad", "input", 0)).float())
    assert not torch.equal(dw, (dyq.T @ x.to(D)).float())  # and x is quantized at all
    # dgrad's W copy, the same way (configuration dense-w)
    x, w, dy = _data("dense-w")
    _, dx, _ = _run(x, w, dy, r, autocast=False)
    dyq = _q(dy, r, "dgrad", "grad_output", 1)
    w_rows = quantize_rowwise(w, r.fprop_weight.elem(), 1).dequantize()
    assert torch.equal(dx, (dyq @ _q(w, r, "dgrad", "weight", 0)).float())
    assert not torch.equal(dx, (dyq @ w_rows.to(D)).float())
    assert not torch.equal(dx, (dyq @ _q(w_rows, r, "dgrad", "weight", 0)).float())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_gw_hp_weight_gradient_is_the_unquantized_one(autocast):
    """fp8-rowwise-gw-hp: dW is dy^T x from the unquantized dy and x, bit for bit, where the
    quantized recipe's is not; y and dx are fp8-rowwise's."""
    dt = torch.bfloat16 if autocast else torch.float32
    for config in ("dense-dy-cols", "dense-x-cols"):
        x, w, dy = _data(config)
        y, dx, dw = _run(x, w, dy, recipe("fp8-rowwise-gw-hp"), autocast)
        y0, dx0, dw0 = _run(x, w, dy, recipe("fp8-rowwise"), autocast)
        hp = (dy.to(dt).to(D).T @ x.to(dt).to(D)).to(dt).float()
        assert torch.equal(dw, hp) and not torch.equal(dw0, hp), config
        assert torch.equal(y, y0) and torch.equal(dx, dx0), config


def test_every_gemm_can_run_in_high_precision():
    """A rowwise recipe with hp_gemms = all three is the unquantized layer (config dense-w,
    where every output is exact), and observes nothing."""
    r = recipe("fp8-rowwise", hp_gemms=("fprop", "dgrad", "wgrad"))
    x, w, dy = _data("dense-w")
    calls = []
    y, dx, dw = _run(x, w, dy, r, False, observer=lambda *a: calls.append(a))
    assert calls == []
    assert torch.equal(y, (x.to(D) @ w.to(D).T).float())
    assert torch.equal(dx, (dy.to(D) @ w.to(D)).float())
    assert torch.equal(dw, (dy.to(D).T @ x.to(D)).float())


# --- SQNR of the three outputs against the unquantized layer ------------------------------
M, K, N = 128, 256, 192
# measured (fp32 and bf16 autocast within 0.3 dB): Gaussian y 28.5, dx 28.7, dW 28.8;
# outliers y 31.3, dx 31.6, dW 29.4; gw-hp dW 134 (fp32) / 51 (bf16) Gaussian, 136 / 47 outliers
BOUNDS = {  # (data, output): (lower, upper) dB for fp8-rowwise
    ("gaussian", "y"): (27.0, 30.5), ("gaussian", "dx"): (27.0, 30.5),
    ("gaussian", "dw"): (27.0, 30.5), ("outlier", "y"): (29.5, 33.5),
    ("outlier", "dx"): (30.0, 33.5), ("outlier", "dw"): (27.5, 31.5),
}  # fmt: skip


def _sqnr_data(kind: str):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 16
    dy = torch.randn(M, N, generator=g)
    if kind == "outlier":  # an outlier row (token) and column (channel) in x and in dy
        x[11, :] *= 100
        x[:, 7] *= 100
        dy[5, :] *= 100
        dy[:, 3] *= 100
    return x, w, dy


def _sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(D), b.to(D)
    return float(10 * torch.log10(b.square().sum() / (a - b).square().sum()).detach())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("kind", ["gaussian", "outlier"])
@pytest.mark.parametrize("name", RECIPES)
def test_sqnr_of_the_three_outputs(name, kind, autocast):
    x, w, dy = _sqnr_data(kind)
    layer = MXLinear(K, N, bias=False, recipe=recipe(name))
    with torch.no_grad():
        layer.weight.copy_(w)
    xin = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(xin)
    y.backward(dy.to(y.dtype))
    ref = {"y": x.to(D) @ w.to(D).T, "dx": dy.to(D) @ w.to(D), "dw": dy.to(D).T @ x.to(D)}
    got = {"y": y, "dx": xin.grad, "dw": layer.weight.grad}
    for key in ("y", "dx", "dw"):
        db = _sqnr(got[key], ref[key])
        if key == "dw" and name == "fp8-rowwise-gw-hp":
            lo, hi = (100.0, 200.0) if not autocast else (42.0, 60.0)  # fp32 / bf16 rounding
        else:
            lo, hi = BOUNDS[kind, key]
        assert lo < db < hi, (key, db)


# --- observer protocol and telemetry ------------------------------------------------------
AXES = {  # (gemm, operand) -> the scaled axis of its copy, in the order the observer sees them
    ("fprop", "input"): 1,
    ("fprop", "weight"): 1,
    ("wgrad", "input"): 0,
    ("dgrad", "grad_output"): 1,
    ("dgrad", "weight"): 0,
    ("wgrad", "grad_output"): 0,
}


@pytest.mark.parametrize("name", RECIPES)
def test_observer_sees_each_quantized_operand_once(name):
    r = recipe(name)
    x, w, dy = _data("dense-x-dy")
    calls = []
    _run(x, w, dy, r, True, observer=lambda *a: calls.append(a))
    want = [k for k in AXES if not (name.endswith("gw-hp") and k[0] == "wgrad")]
    assert [(c[1], c[2]) for c in calls] == want  # in forward, then backward order
    hp_of = {"input": x, "weight": w, "grad_output": dy}
    for _, gemm, operand, hp, q in calls:
        assert isinstance(q, RowwiseFP8) and q.dim == AXES[gemm, operand]
        assert hp.shape == q.shape == (S, S) and torch.equal(hp.float(), hp_of[operand])
        ref = quantize_rowwise(hp_of[operand], r.fmt(gemm, operand).elem(), q.dim)
        assert torch.equal(q.data.view(torch.uint8), ref.data.view(torch.uint8))


@pytest.mark.parametrize("name", RECIPES)
def test_telemetry_records_the_operands(name):
    torch.manual_seed(0)
    r = mxfp8.recipe(name)
    model = torch.nn.Sequential(MXLinear(64, 96, recipe=r, name="up"), torch.nn.GELU(),
                                MXLinear(96, 64, recipe=r, name="down"))  # fmt: skip
    x = torch.randn(64, 64)
    x[:, 3] *= 50  # an outlier channel: a per-tensor or wrong-axis measurement would differ
    x.requires_grad_(True)
    collector = TelemetryCollector(model)
    with collector.capture(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
    rows = {(row["layer"], row["gemm"], row["operand"]): row for row in collector.take()}
    ops = {k for k in AXES if not (name.endswith("gw-hp") and k[0] == "wgrad")}
    assert set(rows) == {(layer, *k) for layer in ("up", "down") for k in ops}
    for row in rows.values():
        assert row["fmt"] == "e4m3" and row["saturated_pct"] == 0.0
        assert 20 < row["sqnr_db"] < 60 and "scale" not in row and "scale_exp_hist" not in row
    for (gemm, operand), dim in (("fprop", "input"), 1), (("wgrad", "input"), 0):
        if (gemm, operand) not in ops:
            continue
        expected = finalize(operand_stats(x.detach(), quantize_rowwise(x.detach(), "e4m3", dim)))
        assert {k: rows["up", gemm, operand][k] for k in expected} == expected
        other = finalize(operand_stats(x.detach(), quantize_rowwise(x.detach(), "e4m3", 1 - dim)))
        assert other["sqnr_db"] != expected["sqnr_db"]


def test_operand_stats_of_a_rowwise_operand():
    """Underflow, saturation and SQNR of a RowwiseFP8, against explicit counts."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 64, generator=g)
    x[2, 0] = 1e7  # row 2's other elements flush to zero; no other row is touched
    q = quantize_rowwise(x, "e4m3", 1)
    deq = q.dequantize()
    row = finalize(operand_stats(x, q))
    flushed = ((x != 0) & (deq == 0)).sum().item()
    assert flushed >= 60 and ((deq == 0) & (x != 0))[[0, 1, 3, 4, 5, 6, 7]].sum() == 0
    assert row["underflow_pct"] == pytest.approx(100 * flushed / x.numel(), rel=1e-5)
    assert row["saturated_pct"] == 0.0 and row["amax"] == pytest.approx(1e7)
    sqnr = 10 * torch.log10(x.double().square().sum() / (x - deq).double().square().sum())
    assert row["sqnr_db"] == pytest.approx(sqnr.item(), rel=1e-4)  # 5 digits kept
    with pytest.raises(ValueError):
        operand_stats(x.t(), q)


def test_weight_cache_in_a_step_window():
    """Two copies of W per window (along K and along N), reused by the micro-batches with
    the same results; outside a window two per forward and backward."""
    r = recipe("fp8-rowwise")
    grads = []
    for window in (False, True):
        torch.manual_seed(1)
        layer = MXLinear(64, 32, recipe=r)
        x = torch.randn(3, 16, 64, requires_grad=True)
        if window:
            with mxfp8.step_window(layer, micro_batches=3):
                for i in range(3):
                    layer(x[i]).square().sum().backward()
                assert layer.weight_cache_nbytes() > 0
        else:
            for i in range(3):
                layer(x[i]).square().sum().backward()
        assert layer.weight_quantizations == (2 if window else 6)
        grads.append(layer.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
