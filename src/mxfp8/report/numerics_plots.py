"""Figures of a run's numerics telemetry (``numerics.jsonl``): per-operand heatmaps of
saturation, underflow and SQNR over layers and steps, E8M0 scale-exponent histograms, and the
scales of per-tensor recipes; built like the curves of :mod:`mxfp8.report.plots`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from mxfp8.report.loader import RunData
from mxfp8.report.plots import Plot, _render

# The six quantized operands of a linear layer, in the order of the three GEMMs.
OPERANDS: tuple[tuple[str, str], ...] = (
    ("fprop", "input"),
    ("fprop", "weight"),
    ("dgrad", "grad_output"),
    ("dgrad", "weight"),
    ("wgrad", "grad_output"),
    ("wgrad", "input"),
)

# numerics.jsonl field -> (title, colormap); SQNR is "higher is better", hence reversed.
HEATMAP_METRICS: dict[str, tuple[str, str]] = {
    "saturated_pct": ("saturated elements (%)", "magma"),
    "underflow_pct": ("non-zero elements flushed to zero (%)", "magma"),
    "sqnr_db": ("SQNR vs high precision (dB)", "viridis_r"),
}

SPECIAL_EXPONENTS = (-127, 128)  # E8M0 bits 0 (all-zero block) and 255 (NaN block)


def _layers_and_steps(rows: Sequence[dict]) -> tuple[list[str], list[int]]:
    layers: dict[str, None] = {}  # insertion-ordered set: model order as logged
    steps: set[int] = set()
    for row in rows:
        layers.setdefault(str(row.get("layer")), None)
        steps.add(int(row.get("step", 0)))
    return list(layers), sorted(steps)


PANELS_PER_ROW = 3


def _operand_panels(run: RunData, keep) -> list[tuple[str, str, list[dict]]]:
    """``(gemm, operand, rows)`` for each quantized operand having numerics rows that ``keep``."""
    panels = []
    for gemm, operand in OPERANDS:
        rows = [
            r
            for r in run.numerics
            if r.get("gemm") == gemm and r.get("operand") == operand and keep(r)
        ]
        if rows:
            panels.append((gemm, operand, rows))
    return panels


def _panel_grid(n: int, panel_height: float) -> tuple[Figure, np.ndarray]:
    """A figure with ``n`` panels, PANELS_PER_ROW a row; the axes flattened, spares hidden."""
    ncols = min(PANELS_PER_ROW, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.2 * ncols, panel_height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def numerics_heatmap(run: RunData, metric: str) -> Plot | None:
    """Layer x step heatmaps of one numerics metric, one panel per quantized operand."""
    title, cmap = HEATMAP_METRICS[metric]
    panels = _operand_panels(run, lambda r: metric in r)
    if not panels:
        return None
    layers, _ = _layers_and_steps([r for _, _, rows in panels for r in rows])
    fig, axes = _panel_grid(len(panels), max(2.5, 0.18 * len(layers) + 1.2))
    for k, (ax, (gemm, operand, rows)) in enumerate(zip(axes, panels, strict=False)):
        _, steps = _layers_and_steps(rows)
        li = {name: i for i, name in enumerate(layers)}
        si = {s: j for j, s in enumerate(steps)}
        grid = np.full((len(layers), len(steps)), np.nan)  # (layer, telemetry step)
        for r in rows:
            v = r.get(metric)
            grid[li[str(r.get("layer"))], si[int(r.get("step", 0))]] = (
                float(v) if isinstance(v, int | float) else np.nan
            )
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap)
        fig.colorbar(image, ax=ax, pad=0.01)
        ax.set_title(f"{gemm} / {operand}", fontsize=9)
        # layer names only on the left column: the panels share rows
        labels = layers if k % PANELS_PER_ROW == 0 else [""] * len(layers)
        ax.set_yticks(range(len(layers)), labels, fontsize=max(4, 8 - len(layers) // 20))
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(f"{run.name}: {title}")
    return Plot(f"{run.name}_{metric}", f"{run.name}: {title}", _render(fig))


def _exp_hist(rows: Sequence[dict]) -> dict[int, int]:
    total: dict[int, int] = defaultdict(int)
    for r in rows:
        hist = r.get("scale_exp_hist")
        if isinstance(hist, dict):
            for exp, count in hist.items():
                total[int(exp)] += int(count)
    return total


def scale_histograms(run: RunData) -> Plot | None:
    """Block-scale exponents of each operand, summed over layers, at the first and last
    telemetry step: a drift of the distribution shows how the tensors' ranges moved."""
    panels = _operand_panels(run, lambda r: bool(r.get("scale_exp_hist")))
    if not panels:
        return None
    fig, axes = _panel_grid(len(panels), 3.2)
    for ax, (gemm, operand, rows) in zip(axes, panels, strict=False):
        steps = sorted({int(r.get("step", 0)) for r in rows})
        chosen = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
        special = 0.0
        for k, step in enumerate(chosen):
            hist = _exp_hist([r for r in rows if int(r.get("step", 0)) == step])
            total = sum(hist.values())
            # E8M0 bits 0 (all-zero blocks) and 255 (NaN) are not scales of data: counted
            # in the title, not drawn, so they do not stretch the axis across 255 binades
            special = max(special, sum(hist.get(e, 0) for e in SPECIAL_EXPONENTS) / total * 100)
            exps = sorted(e for e in hist if e not in SPECIAL_EXPONENTS)
            counts = np.array([hist[e] for e in exps], dtype=float)
            offset = 0.0 if len(chosen) == 1 else (0.2 if k else -0.2)
            ax.bar(
                np.array(exps) + offset,
                counts / total * 100,
                width=0.8 / len(chosen),
                color=f"C{k}",
                label=f"step {step}",
            )
        note = f" ({special:.2g} % zero/NaN blocks)" if special else ""
        ax.set_title(f"{gemm} / {operand}{note}", fontsize=9)
        ax.set_xlabel("scale exponent (E8M0, unbiased)", fontsize=8)
        ax.set_ylabel("% of blocks", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.name}: block scale exponents (all layers)")
    return Plot(f"{run.name}_scale_exp", f"{run.name}: block scale exponents", _render(fig))


def tensorwise_scales(run: RunData) -> Plot | None:
    """log2 of the per-tensor scale over steps, one line per layer, per operand: for the
    per-tensor recipes, which have one scale per tensor instead of block scales."""
    panels = _operand_panels(
        run, lambda r: isinstance(r.get("scale"), int | float) and r["scale"] > 0
    )
    if not panels:
        return None
    fig, axes = _panel_grid(len(panels), 3.2)
    for ax, (gemm, operand, rows) in zip(axes, panels, strict=False):
        by_layer: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            by_layer[str(r.get("layer"))].append((int(r.get("step", 0)), math.log2(r["scale"])))
        for pts in by_layer.values():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=0.8, alpha=0.7)
        ax.set_title(f"{gemm} / {operand}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("log2(scale)", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.name}: per-tensor scales (one line per layer)")
    return Plot(f"{run.name}_tensor_scale", f"{run.name}: per-tensor scales", _render(fig))
