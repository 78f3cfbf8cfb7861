"""Equivalence to bf16 within a margin (report/equivalence.py, ``mxfp8 compare --margin``):
two one-sided t tests on the paired gaps, checked against numbers worked out by hand (closed
forms of Student's t for 2 and 4 degrees of freedom) and against SciPy's one-sample t tests;
the ``--require-equivalent`` gate through the command line, on faked complete runs."""

from __future__ import annotations

import json
import math

import pytest
from runfactory import make_planned_comparison
from scipy import stats as scipy_stats

from mxfp8.cli.main import main
from mxfp8.report.equivalence import (
    EQUIVALENT,
    MAX_SEEDS,
    NOT_EQUIVALENT,
    ONE_SEED,
    UNDECIDED,
    check_margin,
    seeds_needed,
    tost,
)

# gaps m - 1, m, m + 1 (%): mean m, std 1 (ddof=1), n = 3, se = 1 / sqrt(3)
SE = 1 / math.sqrt(3)
# t_{0.95, 2} = (2p - 1) / sqrt(2p(1 - p)) at p = 0.95: the 90 % two-sided quantile, 2 df
T90_2DF = 0.9 / math.sqrt(2 * 0.95 * 0.05)
HALF = T90_2DF * SE  # 1.6859: the half-width of every 90 % interval below
MARGIN = 2.0


def _gaps(m):
    return [m - 1.0, m, m + 1.0]


def _cdf_2df(t):
    """Student's t CDF with 2 degrees of freedom, closed form."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_the_hand_numbers_are_the_textbook_ones():
    assert T90_2DF == pytest.approx(2.919986, abs=1e-6)  # printed tables: 2.920
    assert HALF == pytest.approx(1.685854, abs=1e-6)
    assert scipy_stats.t.ppf(0.95, 2) == pytest.approx(T90_2DF, rel=1e-12)


def test_equivalent_when_the_90_percent_interval_lies_inside_the_margin():
    e = tost("mxfp8", _gaps(0.2), MARGIN)
    # [0.2 - 1.6859, 0.2 + 1.6859] = [-1.4859, +1.8859] inside [-2, +2]; the 95 % interval
    # (t = 4.303: [-2.284, +2.684]) would not be, nor would it be with z at 95 %
    assert (e.interval.low, e.interval.high) == pytest.approx((-1.485854, 1.885854), abs=1e-6)
    assert e.interval.t == pytest.approx(T90_2DF, rel=1e-12) and e.interval.df == 2
    t_lo, t_hi = 2.2 / SE, -1.8 / SE  # (m + margin) / se, (m - margin) / se
    assert (e.t_lower, e.t_upper) == pytest.approx((t_lo, t_hi), rel=1e-12)
    assert e.p_lower == pytest.approx(1 - _cdf_2df(t_lo), rel=1e-9)  # 0.0312
    assert e.p_upper == pytest.approx(_cdf_2df(t_hi), rel=1e-9)  # 0.045: just under 0.05
    assert e.p_upper == pytest.approx(0.044656, abs=1e-6)
    lo = scipy_stats.ttest_1samp(_gaps(0.2), -MARGIN, alternative="greater")
    hi = scipy_stats.ttest_1samp(_gaps(0.2), MARGIN, alternative="less")
    assert (e.p_lower, e.p_upper) == pytest.approx((lo.pvalue, hi.pvalue), rel=1e-9)
    assert e.verdict == EQUIVALENT and e.seeds_needed is None and e.seeds_note == ""


def test_not_equivalent_when_the_interval_lies_beyond_the_margin():
    e = tost("fp8", _gaps(4.0), MARGIN)
    # [2.3141, 5.6859]: all above +2 (the 95 % interval, [1.516, 6.484], straddles +2)
    assert (e.interval.low, e.interval.high) == pytest.approx((2.314146, 5.685854), abs=1e-6)
    assert e.p_upper == pytest.approx(_cdf_2df(2.0 / SE), rel=1e-9)  # 0.9614: far from < 0.05
    assert e.verdict == NOT_EQUIVALENT and e.seeds_needed is None
    below = tost("fp8", _gaps(-4.0), MARGIN)
    assert below.verdict == NOT_EQUIVALENT and below.interval.high == pytest.approx(-2.314146)


def test_undecided_with_the_seeds_that_would_decide():
    e = tost("mxfp8-floor", _gaps(0.9), MARGIN)
    # [-0.7859, +2.5859] straddles +2 (with z, 1.645 / sqrt(3): [-0.05, +1.85], "equivalent")
    assert (e.interval.low, e.interval.high) == pytest.approx((-0.785854, 2.585854), abs=1e-6)
    assert e.verdict == UNDECIDED
    # smallest n with 0.9 + t_{0.95, n-1} / sqrt(n) <= 2: n = 4 gives 0.9 + 2.3534 / 2 = 2.077,
    # n = 5 gives 0.9 + 2.1318 / sqrt(5) = 1.853 (2.1318: the closed form for 4 df)
    a = 4 * 0.95 * 0.05
    t4 = 2 * math.sqrt(math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a) - 1)
    assert t4 == pytest.approx(2.131847, abs=1e-6)
    assert 0.9 + 2.353363 / 2 > MARGIN and 0.9 + t4 / math.sqrt(5) <= MARGIN
    assert e.seeds_needed == 5  # with 95 % quantiles it would be 6, with z 3
    assert "about 5 seeds in all would likely show equivalence" in e.seeds_note

    beyond = tost("x", _gaps(3.0), MARGIN)  # [1.314, 4.686]: straddles +2 from above
    assert beyond.verdict == UNDECIDED
    # smallest n with 3 - t_{0.95, n-1} / sqrt(n) > 2: n = 4: 1.18 > 1; n = 5: 0.95 < 1
    assert beyond.seeds_needed == 5 and "show non-equivalence" in beyond.seeds_note
    assert "no number of seeds shows equivalence" in beyond.seeds_note

    on = tost("x", _gaps(2.0), MARGIN)  # the mean on the margin: no n decides
    assert on.verdict == UNDECIDED and on.seeds_needed is None
    assert "lies on the margin" in on.seeds_note
    needed, note = seeds_needed(1.999, 1.0, MARGIN, 3)  # (1.645 / 0.001)^2: millions
    assert needed is None and f"more than {MAX_SEEDS} seeds would be needed" in note


def test_one_seed_no_pair_and_equal_gaps():
    one = tost("x", [0.5], 1.0)
    assert one.verdict == ONE_SEED == "undecided (one seed)"
    assert one.interval is None and one.p_lower is None and one.seeds_needed is None
    same = tost("x", [0.5, 0.5, 0.5], 1.0)  # std 0: the interval is the mean itself
    assert same.verdict == EQUIVALENT and (same.p_lower, same.p_upper) == (0.0, 0.0)
    assert tost("x", [], 1.0).verdict.startswith("undecided (no bf16 run")


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "1"])
def test_bad_margins_are_refused(bad):
    with pytest.raises(ValueError, match="margin must be a finite number > 0"):
        check_margin(bad)
    assert check_margin(1) == 1.0


BF16 = [2.0, 2.1, 2.2]


def _with_gaps(gaps):
    return [b * (1 + g / 100) for b, g in zip(BF16, gaps, strict=True)]


def test_require_equivalent_gates_the_exit_status(tmp_path, capsys):
    args = make_planned_comparison(
        tmp_path / "cmp",
        {"bf16": BF16, "mxfp8": _with_gaps(_gaps(0.2)), "fp32": _with_gaps(_gaps(4.0))},
        seeds=(0, 1, 2),
    )
    # mxfp8 is equivalent within 2 %; fp32 is not, but it is not quantized: not gated
    assert main([*args, "--margin", "2", "--require-equivalent"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.split("equivalence to bf16 within +-2 %")[1].splitlines()
                if x.startswith("mxfp8 "))  # fmt: skip
    assert "[-1.49 %, +1.89 %]" in line and line.endswith(f"  {EQUIVALENT}")
    fp32 = next(x for x in out.split("equivalence to bf16")[1].splitlines() if x.startswith("fp32"))
    assert fp32.endswith(NOT_EQUIVALENT)
    index = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert index["margin"] == 2.0
    eq = index["stats"]["equivalence"]
    assert eq["margin_pct"] == 2.0 and eq["level"] == 0.9
    mx = eq["recipes"]["mxfp8"]
    assert mx["ci90_pct"] == pytest.approx([-1.485854, 1.885854], abs=1e-6)
    assert mx["t_quantile"] == pytest.approx(T90_2DF, rel=1e-9) and mx["df"] == 2
    assert mx["p_upper"] == pytest.approx(0.044656, abs=1e-6) and mx["verdict"] == EQUIVALENT
    assert mx["seeds_needed"] is None and "bf16" not in eq["recipes"]
    assert eq["recipes"]["fp32"]["verdict"] == NOT_EQUIVALENT
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "<h3>Equivalence to bf16 within &plusmn;2 %</h3>" in page
    assert "[-1.486, +1.886] (t = 2.920, 2 df)" in page
    assert f'<td class="good">{EQUIVALENT}</td>' in page

    # within 0.5 %, mxfp8's interval straddles the margin: undecided, and the gate says no
    assert main([*args, "--margin", "0.5", "--require-equivalent"]) == 1
    err = capsys.readouterr().err
    assert "--require-equivalent: not equivalent to bf16 within +-0.5 %: mxfp8 (undecided" in err
    assert "fp32" not in err.split("--require-equivalent:")[1]
    eq = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["stats"]["equivalence"]
    assert eq["margin_pct"] == 0.5 and eq["recipes"]["mxfp8"]["verdict"] == UNDECIDED
    assert "&plusmn;0.5 %" in (tmp_path / "cmp" / "report.html").read_text()
    assert main([*args, "--margin", "0.5"]) == 0  # without the gate: the same table, status 0


def test_margin_usage_errors(tmp_path, capsys):
    base = ["compare", "--out", str(tmp_path / "cmp"), "--steps", "4", "--seeds", "0,1"]
    assert main([*base, "--require-equivalent"]) == 2
    assert "--require-equivalent needs --margin PCT" in capsys.readouterr().err
    for bad in ("0", "-1", "nan", "inf", "abc"):
        assert main([*base, "--margin", bad]) == 2
        assert f"--margin: {bad!r} is not a finite number > 0" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "cmp"), "--margin", "1"]) == 2
    assert "--margin needs --seeds" in capsys.readouterr().err
    assert not tmp_path.joinpath("cmp").exists()  # refused before anything was written
