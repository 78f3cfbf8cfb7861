"""Statistics over seeds (report/stats.py), the multi-seed loader, the band plots and the
multi-seed report, on synthetic comparison directories with hand-chosen final losses."""

from __future__ import annotations

import json
import math

import pytest
from runfactory import make_seeded_comparison

from mxfp8.report import plots
from mxfp8.report.comparison_stats import stats_json
from mxfp8.report.html import summary_rows, write_report
from mxfp8.report.loader import load_runs
from mxfp8.report.plots import relative_gap
from mxfp8.report.stats import (
    BETTER,
    INDISTINGUISHABLE,
    ONE_SEED,
    WORSE,
    Interval,
    against,
    mean,
    sample_std,
    seed_stats,
    t_cdf,
    t_interval,
    t_quantile,
    verdict,
)

BF16 = [2.0, 2.1, 2.2]  # seeds 0, 1, 2


def _with_gaps(gaps):
    """Final losses of a recipe whose paired gap to BF16 is ``gaps`` (%), seed by seed."""
    return [b * (1 + g / 100) for b, g in zip(BF16, gaps, strict=True)]


LOSSES = {
    "bf16": BF16,
    "mxfp8": _with_gaps([1.0, 2.0, 3.0]),  # interval holds 0
    "mxfp8-floor": _with_gaps([1.0, 1.1, 0.9]),  # above 0
    "fp8-tensorwise": _with_gaps([-1.0, -1.1, -0.9]),  # below 0
}


def _t2(p):  # Student's t quantile for 2 degrees of freedom, closed form
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def _t4(p):  # closed form for 4 degrees of freedom
    a = 4 * p * (1 - p)
    q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
    return math.copysign(2 * math.sqrt(q - 1), p - 0.5)


@pytest.mark.parametrize("p", [0.975, 0.995, 0.9, 0.6, 0.999, 0.025, 0.3])
def test_t_quantile_matches_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    assert t_quantile(p, 2) == pytest.approx(_t2(p), rel=1e-12)
    assert t_quantile(p, 4) == pytest.approx(_t4(p), rel=1e-12)
    for df in (1, 3, 7, 29, 300):
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-13)


def test_t_quantile_matches_the_printed_tables():
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 20: 2.0860,
             30: 2.0423, 60: 2.0003, 120: 1.9799}  # fmt: skip
    for df, t in table.items():
        assert t_quantile(0.975, df) == pytest.approx(t, abs=5e-5)
    assert t_quantile(0.975, 1e9) == pytest.approx(1.959964, abs=1e-6)  # the normal limit
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_t_quantile_matches_scipy():
    from scipy import stats  # a dev extra: missing, the test fails

    for df in (*range(1, 31), 45, 60, 100):
        for p in (0.975, 0.995, 0.9):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10)


def test_mean_std_and_the_t_interval_by_hand():
    assert mean([1.0, 2.0, 3.0]) == 2.0
    assert sample_std([1.0, 2.0, 3.0]) == pytest.approx(1.0)  # ddof=1: sqrt(2 / 2)
    assert sample_std([2.0, 4.0]) == pytest.approx(math.sqrt(2.0))  # not 1.0 (ddof=0)
    assert sample_std([5.0]) is None and t_interval([5.0]) is None
    iv = t_interval([1.0, 2.0, 3.0])
    half = _t2(0.975) * 1.0 / math.sqrt(3)  # 4.3027 * std / sqrt(n)
    assert iv.n == 3 and iv.df == 2 and iv.t == pytest.approx(4.302652729749464, rel=1e-12)
    assert (iv.mean, iv.low, iv.high) == pytest.approx((2.0, 2 - half, 2 + half), rel=1e-12)
    assert iv.low == pytest.approx(-0.48413771175, abs=1e-10)
    assert verdict(iv) == INDISTINGUISHABLE


def test_verdict_at_the_edges_of_the_interval():
    def iv(low, high):
        return Interval(mean=(low + high) / 2, low=low, high=high, n=3, t=4.3)

    assert verdict(iv(0.0, 1.0)) == INDISTINGUISHABLE  # 0 on the edge: contained
    assert verdict(iv(-1.0, 0.0)) == INDISTINGUISHABLE
    assert verdict(iv(0.0, 0.0)) == INDISTINGUISHABLE
    assert verdict(iv(1e-12, 1.0)) == WORSE
    assert verdict(iv(-1.0, -1e-12)) == BETTER
    assert verdict(None) == ONE_SEED


def test_seed_stats_pair_each_seed_with_its_bf16_run(tmp_path):
    runs = load_runs(make_seeded_comparison(tmp_path, LOSSES))
    stats = {s.recipe: s for s in seed_stats(runs)}
    assert list(stats) == list(LOSSES)
    base = stats["bf16"]
    assert base.verdict == "baseline" and base.interval is None and base.gap_pct == {}
    assert base.val_loss_mean == pytest.approx(2.1) and base.val_loss_std == pytest.approx(0.1)
    half = _t2(0.975) / math.sqrt(3)  # times each recipe's std of the gaps
    cases = {"mxfp8": (2.0, 1.0, INDISTINGUISHABLE), "mxfp8-floor": (1.0, 0.1, WORSE),
             "fp8-tensorwise": (-1.0, 0.1, BETTER)}  # fmt: skip
    for recipe, (m, sd, expected) in cases.items():
        s = stats[recipe]
        gaps = {0: m - sd, 1: m, 2: m + sd} if recipe == "mxfp8" else None
        if gaps:  # paired seed by seed: gap of seed k to bf16 seed k, not to the bf16 mean
            assert s.gap_pct == pytest.approx(gaps, rel=1e-9)
        assert s.seeds == [0, 1, 2] and s.gap_mean_pct == pytest.approx(m, rel=1e-9)
        assert (s.interval.low, s.interval.high) == pytest.approx(
            (m - half * sd, m + half * sd), rel=1e-9
        )
        assert s.verdict == expected
        assert s.val_loss_mean == pytest.approx(mean(LOSSES[recipe]))
        assert s.val_loss_std == pytest.approx(sample_std(LOSSES[recipe]))
    # unpaired (against the bf16 mean) the mean gap would differ: the pairing matters here
    unpaired = (mean(LOSSES["mxfp8"]) - 2.1) / 2.1 * 100
    assert abs(unpaired - stats["mxfp8"].gap_mean_pct) > 0.01
    js = stats_json(runs)
    assert "t-distribution with n - 1 degrees of freedom" in js["interval"]
    floor = js["recipes"]["mxfp8-floor"]
    assert floor["df"] == 2 and floor["verdict"] == WORSE and floor["seeds"] == [0, 1, 2]
    assert floor["gap_ci95_pct"] == pytest.approx([1 - half * 0.1, 1 + half * 0.1], rel=1e-9)
    assert js["recipes"]["bf16"]["gap_ci95_pct"] is None


def test_ablations_are_paired_against_mxfp8_seed_by_seed(tmp_path, capsys):
    def on_mxfp8(gaps):
        return [m * (1 + g / 100) for m, g in zip(LOSSES["mxfp8"], gaps, strict=True)]

    losses = {**LOSSES, "mxfp8-floor": on_mxfp8([0.4, 0.5, 0.6]),
              "fp8-tensorwise": on_mxfp8([-1.0, 1.0, 3.0])}  # fmt: skip
    runs = load_runs(make_seeded_comparison(tmp_path, losses))
    pairs = {p.recipe: p for p in against(seed_stats(runs))}
    assert set(pairs) == {"mxfp8-floor", "fp8-tensorwise"}  # not bf16, not mxfp8 itself
    floor = pairs["mxfp8-floor"]
    assert floor.gap_pct == pytest.approx({0: 0.4, 1: 0.5, 2: 0.6}, rel=1e-9)
    half = _t2(0.975) / math.sqrt(3) * 0.1
    assert (floor.interval.low, floor.interval.high) == pytest.approx((0.5 - half, 0.5 + half))
    # worse than mxfp8, though against bf16 (whose gap to mxfp8 swings 1-3 %) it is not
    assert floor.verdict == WORSE
    assert {s.recipe: s for s in seed_stats(runs)}["mxfp8-floor"].verdict == INDISTINGUISHABLE
    assert pairs["fp8-tensorwise"].verdict == "indistinguishable from mxfp8"
    js = stats_json(runs)["against_mxfp8"]
    assert js["mxfp8-floor"]["verdict"] == WORSE and js["mxfp8-floor"]["gap_mean_pct"] > 0.49
    assert against(seed_stats(runs), reference="mxfp9") == []
    from mxfp8.cli.compare import print_seed_stats
    from mxfp8.report.seed_tables import against_table

    page = against_table(seed_stats(runs))
    ci = f"[{floor.interval.low:+.3f}, {floor.interval.high:+.3f}]"
    assert "<h3>Against mxfp8</h3>" in page and f'<td class="bad">{ci}</td>' in page
    assert "0: +0.400, 1: +0.500, 2: +0.600" in page
    print_seed_stats(runs)
    text = capsys.readouterr().out.split("against mxfp8, paired")[1]
    floor_line = next(line for line in text.splitlines() if line.startswith("mxfp8-floor"))
    assert "+0.50 %" in floor_line and floor_line.endswith(WORSE)
    assert "against_mxfp8" not in stats_json([r for r in runs if r.key != "mxfp8"])


def test_incomplete_runs_one_seed_and_cloze(tmp_path):
    cmp_dir = make_seeded_comparison(tmp_path, {"bf16": BF16, "mxfp8": _with_gaps([1, 2, 3])})
    summary = cmp_dir / "mxfp8" / "seed2" / "summary.json"  # stopped at step 20 of 30
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "steps": 20}))
    for k, (mi, acc) in enumerate([(0.5, 0.6), (0.7, 0.8)]):
        evals = [
            {"recipe": "mxfp8", "tasks": {"cloze": {"acc": acc, "acc_mutual_info": mi}}},
            {"recipe": "bf16", "tasks": {"cloze": {"acc": 0.0, "acc_mutual_info": 0.0}}},
        ]  # the second, under another recipe, is not this run's score
        path = cmp_dir / "mxfp8" / f"seed{k}" / "eval.json"
        path.write_text(json.dumps({"evaluations": evals}))
    s = {x.recipe: x for x in seed_stats(load_runs(cmp_dir))}["mxfp8"]
    assert s.seeds == [0, 1] and s.incomplete == [2]  # the unfinished seed is left out
    assert s.gap_mean_pct == pytest.approx(1.5) and s.interval.df == 1
    assert s.interval.t == pytest.approx(math.tan(0.475 * math.pi))  # t_{0.975, 1} = 12.706
    assert s.cloze == pytest.approx({"acc_mutual_info": 0.6, "acc": 0.7})  # own recipe only
    assert s.cloze_seeds == [0, 1]

    one = make_seeded_comparison(tmp_path / "one", {"bf16": [2.0], "mxfp8": [2.1]}, seeds=(3,))
    s = {x.recipe: x for x in seed_stats(load_runs(one))}["mxfp8"]
    assert s.seeds == [3] and s.gap_pct == pytest.approx({3: 5.0})
    assert s.interval is None and s.val_loss_std is None and s.verdict == ONE_SEED


def test_loader_reads_seed_directories_in_order(tmp_path):
    cmp_dir = make_seeded_comparison(tmp_path, {"mxfp8": [2.1] * 3, "bf16": BF16})
    runs = load_runs(cmp_dir)
    assert [r.name for r in runs] == [f"{r}/seed{k}" for r in ("mxfp8", "bf16") for k in range(3)]
    assert [r.seed for r in runs] == [0, 1, 2] * 2 and runs[0].recipe == "mxfp8"
    assert {r.key for r in runs} == {"mxfp8", "bf16"}
    rows = {r["run"]: r for r in summary_rows(runs)}  # gap to the bf16 run of the same seed
    assert rows["mxfp8/seed2"]["gap_pct"] == pytest.approx((2.1 - 2.2) / 2.2 * 100)
    assert rows["mxfp8/seed0"]["gap_pct"] == pytest.approx((2.1 - 2.0) / 2.0 * 100)
    (cmp_dir / "comparison.json").write_text(json.dumps({"recipes": ["bf16", "mxfp8"],
                                                         "seeds": [1, 0]}))  # fmt: skip
    runs = load_runs(cmp_dir)  # only the listed seeds
    assert [r.name for r in runs] == ["bf16/seed0", "bf16/seed1", "mxfp8/seed0", "mxfp8/seed1"]


def test_over_seeds_is_mean_min_max_on_common_steps():
    steps, mid, lo, hi = plots._over_seeds([([1, 2, 3], [1.0, 2.0, 3.0]),
                                            ([2, 3, 4], [4.0, 0.0, 9.0])])  # fmt: skip
    assert list(steps) == [2, 3]
    assert list(mid) == [3.0, 1.5] and list(lo) == [2.0, 0.0] and list(hi) == [4.0, 3.0]


def test_band_plots_span_the_seeds(tmp_path, monkeypatch):
    runs = load_runs(make_seeded_comparison(tmp_path, LOSSES))
    figures = []
    monkeypatch.setattr(plots, "_render", lambda fig: figures.append(fig) or b"")
    loss = plots.loss_curves_over_seeds(runs)
    gap = plots.gap_curves_over_seeds(runs)
    assert "min to max over seeds" in loss.title and "min to max over seeds" in gap.title
    _, ax_val = figures[0].axes[:2]
    assert len(ax_val.collections) == len(LOSSES)  # one band per recipe
    bf16 = [r for r in runs if r.key == "bf16"]
    vals = [v for r in bf16 for v in r.series("val_loss")[1]]
    box = ax_val.collections[0].get_paths()[0].get_extents()
    assert (box.y0, box.y1) == pytest.approx((min(vals), max(vals)))
    (ax_gap,) = figures[1].axes
    assert len(ax_gap.collections) == 2 * (len(LOSSES) - 1)  # train and val band per recipe
    mx = [r for r in runs if r.key == "mxfp8"]
    base = {r.seed: r for r in bf16}
    gaps = [g for r in mx for g in relative_gap(r, base[r.seed], "val_loss")[1]]
    box = ax_gap.collections[1].get_paths()[0].get_extents()  # mxfp8's val band
    assert (box.y0, box.y1) == pytest.approx((min(gaps), max(gaps)))


def test_multi_seed_report_shows_intervals_verdicts_and_bands(tmp_path):
    losses = {k: LOSSES[k] for k in ("bf16", "mxfp8-floor")}  # few figures: seconds each
    cmp_dir = make_seeded_comparison(tmp_path, losses)
    page = write_report(cmp_dir).read_text()
    stats = {s.recipe: s for s in seed_stats(load_runs(cmp_dir))}
    iv = stats["mxfp8-floor"].interval
    assert f"[{iv.low:+.3f}, {iv.high:+.3f}] (t = 4.303, 2 df)" in page
    assert f'<td class="bad">{WORSE}</td>' in page and "<td>baseline</td>" in page
    assert "Student&#x27;s t-distribution with n - 1 degrees of freedom" in page
    assert "Runs, seed by seed" in page and "mxfp8-floor/seed2" in page
    assert "<title>mxfp8 comparison: bf16, mxfp8-floor (seeds 0, 1, 2)</title>" in page
    assert "shaded band: min to max over seeds" in page
    names = {p.stem for p in (cmp_dir / "plots").glob("*.png")}
    assert {"loss", "gap", "mxfp8-floor_seed0_saturated_pct", "mxfp8-floor_seed0_sqnr_db"} <= names
    assert not any("seed1" in n or "seed2" in n for n in names)  # numerics: first seed only


def test_single_seed_report_has_no_seed_statistics(comparison_report):
    _, path = comparison_report
    page = path.read_text()
    assert "Runs, seed by seed" not in page and "confidence interval" not in page
    assert "min to max" not in page and "Loss curves (" in page
    assert "Relative gap to bf16 (" in page
