"""Matplotlib figures of runs, rendered to PNG bytes.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot``: no global figure state, no GUI backend, safe to call from a training process.
Every function returns ``None`` when the runs hold nothing to draw (a bf16 run has no
numerics), so the report simply leaves that figure out. This module draws the loss and gap
curves (one seed, or bands over seeds); :mod:`mxfp8.report.numerics_plots` the telemetry.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mxfp8.report.loader import RunData, baseline, by_recipe, paired_baseline

DPI = 100


@dataclass(frozen=True)
class Plot:
    """One rendered figure: ``name`` is the PNG file stem under plots/."""

    name: str
    title: str
    png: bytes


def _render(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def smooth(values: Sequence[float], span: int) -> np.ndarray:
    """Bias-corrected EMA with a time constant of ``span`` points.

    NaN values stay NaN in the output and do not poison later points, so a single bad step
    remains visible without hiding the rest of the curve.
    """
    out = np.full(len(values), np.nan)
    if span <= 1:
        return np.asarray(values, dtype=float)
    alpha = 2.0 / (span + 1.0)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def default_span(n: int) -> int:
    """About 1/20 of the curve, at least 1: enough to read a trend, not to hide a spike."""
    return max(1, n // 20)


def loss_curves(runs: Sequence[RunData]) -> Plot | None:
    """Train loss (raw, faint, and smoothed) and validation loss per run, side by side."""
    if not any(r.series("loss")[0] for r in runs):
        return None
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        steps, loss = run.series("loss")
        if steps:
            ax_train.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
            ax_train.plot(steps, smooth(loss, default_span(len(loss))), color=color, label=run.name)
        vsteps, vloss = run.series("val_loss")
        if vsteps:
            ax_val.plot(vsteps, vloss, color=color, marker="o", markersize=3, label=run.name)
    ax_train.set(title="training loss (faint: raw, solid: EMA)", xlabel="step", ylabel="loss")
    ax_val.set(title="validation loss", xlabel="step", ylabel="loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return Plot("loss", "Loss curves", _render(fig))


def relative_gap(run: RunData, base: RunData, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, gap %) of ``run`` to ``base`` on the steps both logged, each curve smoothed.

    gap = (run - base) / base * 100, so a positive gap means a worse (higher) loss.
    """
    s_run, v_run = run.series(key)
    s_base, v_base = base.series(key)
    sm_run = dict(zip(s_run, smooth(v_run, default_span(len(v_run))), strict=True))
    sm_base = dict(zip(s_base, smooth(v_base, default_span(len(v_base))), strict=True))
    common = sorted(set(sm_run) & set(sm_base))
    steps = np.array(common, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.array([(sm_run[s] - sm_base[s]) / sm_base[s] * 100 for s in common])
    return steps, gap


def gap_curves(runs: Sequence[RunData]) -> Plot | None:
    """Relative gap of each run's smoothed train (and validation) loss to the bf16 run."""
    base = baseline(runs)
    others = [r for r in runs if r is not base]
    if base is None or not others:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    drew = False
    for i, run in enumerate(runs):
        if run is base:
            continue
        color = f"C{i % 10}"
        steps, gap = relative_gap(run, base, "loss")
        if len(steps):
            ax.plot(steps, gap, color=color, label=f"{run.name} (train, EMA)")
            drew = True
        vsteps, vgap = relative_gap(run, base, "val_loss")
        if len(vsteps):
            ax.plot(
                vsteps,
                vgap,
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{run.name} (val)",
            )
            drew = True
    if not drew:
        return None
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(title=f"loss gap to {base.name} (%; > 0 is worse)", xlabel="step", ylabel="gap (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Plot("gap", "Relative gap to bf16", _render(fig))


BAND = "band: min to max over seeds"


def _seeds_text(runs: Sequence[RunData]) -> str:
    return ", ".join(str(k) for k in sorted({r.seed for r in runs if r.seed is not None}))


def _over_seeds(curves: Sequence[tuple[Sequence[float], Sequence[float]]]):
    """(steps, mean, min, max) over curves, on the steps every curve has; NaN where a seed
    is NaN (a blow-up stays visible)."""
    if not curves:
        return np.array([]), np.array([]), np.array([]), np.array([])
    points = [dict(zip(map(float, steps), values, strict=True)) for steps, values in curves]
    common = sorted(set.intersection(*(set(p) for p in points)))
    if not common:
        return np.array([]), np.array([]), np.array([]), np.array([])
    grid = np.array([[p[s] for s in common] for p in points], dtype=float)  # (seed, step)
    return np.array(common), grid.mean(axis=0), grid.min(axis=0), grid.max(axis=0)


def _band(ax, curves, color: str, label: str, **line) -> bool:
    steps, mid, lo, hi = _over_seeds(curves)
    if not len(steps):
        return False
    ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.plot(steps, mid, color=color, label=label, **line)
    return True


def loss_curves_over_seeds(runs: Sequence[RunData]) -> Plot | None:
    """Train loss (EMA of each seed) and validation loss per recipe: the mean over its seeds,
    with a band from the lowest to the highest seed at each step."""
    if not any(r.series("loss")[0] for r in runs):
        return None
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    for i, (recipe, group) in enumerate(by_recipe(runs).items()):
        color, n = f"C{i % 10}", len(group)
        train = []
        for run in group:
            steps, loss = run.series("loss")
            if steps:
                train.append((steps, smooth(loss, default_span(len(loss)))))
        _band(ax_train, train, color, f"{recipe} ({n} seeds)")
        val = [run.series("val_loss") for run in group if run.series("val_loss")[0]]
        _band(ax_val, val, color, f"{recipe} ({n} seeds)", marker="o", markersize=3)
    ax_train.set(title=f"training loss (EMA): mean over seeds, {BAND}", xlabel="step",
                 ylabel="loss")  # fmt: skip
    ax_val.set(title=f"validation loss: mean over seeds, {BAND}", xlabel="step", ylabel="loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    title = f"Loss curves: mean over seeds {_seeds_text(runs)}; shaded {BAND}"
    return Plot("loss", title, _render(fig))


def gap_curves_over_seeds(runs: Sequence[RunData]) -> Plot | None:
    """Per recipe, the gap of each seed to the bf16 run of the same seed (train EMA, and
    validation): their mean, with a band from the lowest to the highest seed."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    drew = False
    for i, (recipe, group) in enumerate(by_recipe(runs).items()):
        pairs = [(r, b) for r in group if (b := paired_baseline(runs, r)) and b is not r]
        if not pairs:
            continue
        color = f"C{i % 10}"
        train = [g for r, b in pairs if len((g := relative_gap(r, b, "loss"))[0])]
        drew |= _band(ax, train, color, f"{recipe} (train, EMA; {len(pairs)} seeds)")
        val = [g for r, b in pairs if len((g := relative_gap(r, b, "val_loss"))[0])]
        drew |= _band(ax, val, color, f"{recipe} (val)", linestyle="--", marker="o",
                      markersize=3)  # fmt: skip
    if not drew:
        return None
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(title="paired loss gap to bf16 of the same seed (%; > 0 is worse)", xlabel="step",
           ylabel="gap (%)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = (f"Relative gap to bf16, seed by seed: mean over seeds {_seeds_text(runs)}; "
             f"shaded {BAND}")  # fmt: skip
    return Plot("gap", title, _render(fig))
