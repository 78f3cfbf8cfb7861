"""The self-contained HTML report of a run or a comparison directory.

One file, no network: CSS inline, every figure embedded as a base64 PNG (and also written
to ``plots/*.png`` next to it, for slides and docs). A few lines of inline script check, after
load, that every image decoded, and log a console error if one did not: so "no console
errors in a browser" also means "every figure rendered".
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mxfp8.report.equivalence import check_margin
from mxfp8.report.loader import (
    COMPARISON_INDEX,
    RunData,
    baseline,
    by_recipe,
    is_multi_seed,
    load_runs,
    paired_baseline,
)
from mxfp8.report.numerics_plots import (
    HEATMAP_METRICS,
    numerics_heatmap,
    scale_histograms,
    tensorwise_scales,
)
from mxfp8.report.plots import (
    Plot,
    gap_curves,
    gap_curves_over_seeds,
    loss_curves,
    loss_curves_over_seeds,
)
from mxfp8.report.seed_tables import fmt as _fmt
from mxfp8.report.seed_tables import seed_table

REPORT_NAME = "report.html"
PLOTS_DIR = "plots"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
td.bad { background: #fde2e2; } td.good { background: #e3f6e3; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
"""

# Runs after load: counts decoded images into data-images-ok, and reports any image that
# failed to decode as a console error (which a headless-browser test then catches).
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
    else { console.error("report image failed to decode: " + imgs[i].alt); }
  }
  document.body.setAttribute("data-images-ok", String(ok));
});
"""


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _gap_pct(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return (value - base) / base * 100.0


def summary_rows(runs: Sequence[RunData]) -> list[dict[str, object]]:
    """The numbers of the summary table, one dict per run (also used by docs and tests). The
    gaps are to the bf16 run of the run's seed (:func:`~mxfp8.report.loader.paired_baseline`):
    in a single-seed comparison, the bf16 run."""
    rows = []
    for run in runs:
        base = paired_baseline(runs, run)
        base_val = base.final("final_val_loss") if base else None
        base_ppl = base.final("final_val_ppl") if base else None
        val = run.final("final_val_loss")
        ppl = run.final("final_val_ppl")
        if ppl is None and val is not None:
            ppl = math.exp(val)
        steps = run.summary.get("steps")
        if not isinstance(steps, int):
            logged = run.series("loss")[0]
            steps = logged[-1] if logged else None
        skipped = run.summary.get("skipped_steps", run.last("skipped_steps"))
        rows.append(
            {
                "run": run.name,
                "recipe": run.recipe,
                "seed": run.seed,
                "steps": steps,
                "val_loss": val,
                "val_ppl": ppl,
                "gap_pct": None if run is base else _gap_pct(val, base_val),
                "ppl_gap_pct": None if run is base else _gap_pct(ppl, base_ppl),
                "tokens_per_s": run.final("tokens_per_s"),
                "wall_time_s": _finite_or_none(run.summary.get("wall_time_s")),
                "skipped_steps": int(skipped) if isinstance(skipped, int | float) else None,
                "diverged": run.diverged,
                "events": len(run.events),
                "first_event_step": run.events[0].get("step") if run.events else None,
            }
        )
    return rows


def _finite_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _table(runs: Sequence[RunData]) -> str:
    head = (
        "<tr><th>run</th><th>recipe</th><th>steps</th><th>final val loss</th>"
        "<th>val ppl</th><th>gap to bf16 (loss %)</th><th>gap to bf16 (ppl %)</th>"
        "<th>tokens/s (steady state)</th><th>wall time (s)</th><th>skipped steps</th>"
        "<th>divergence flags</th></tr>"
    )
    body = []
    for row in summary_rows(runs):
        gap = row["gap_pct"]
        gap_cls = "" if gap is None else (' class="bad"' if gap > 1.0 else ' class="good"')
        flags = (
            f"{row['events']} flag(s), first at step {html.escape(str(row['first_event_step']))}"
            if row["events"]
            else "none"
        )
        if row["diverged"]:
            div = f'<td class="bad">diverged; {flags}</td>'
        else:
            div = f"<td{' class=bad' if row['events'] else ''}>{flags}</td>"

        steps = row["steps"]
        skipped = row["skipped_steps"]
        body.append(
            f"<tr><td>{html.escape(str(row['run']))}</td>"
            f"<td>{html.escape(str(row['recipe']))}</td>"
            f"<td>{'&ndash;' if steps is None else steps}</td>"
            f"<td>{_fmt(row['val_loss'])}</td><td>{_fmt(row['val_ppl'], 3)}</td>"
            f"<td{gap_cls}>{_fmt(gap, 3)}</td><td>{_fmt(row['ppl_gap_pct'], 3)}</td>"
            f"<td>{_fmt(row['tokens_per_s'], 1)}</td><td>{_fmt(row['wall_time_s'], 1)}</td>"
            f"<td>{'&ndash;' if skipped is None else skipped}</td>{div}</tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def eval_rows(runs: Sequence[RunData]) -> list[dict[str, object]]:
    """One row per (run, evaluation) of the runs' eval.json, one column per task score."""
    rows = []
    for run in runs:
        for e in run.evaluations:
            row: dict[str, object] = {"run": run.name, "recipe": e.get("recipe"),
                                      "data": e.get("data"), "loss": e.get("loss"),
                                      "perplexity": e.get("perplexity"),
                                      "bits_per_byte": e.get("bits_per_byte")}  # fmt: skip
            for name, t in (e.get("tasks") or {}).items():
                row[name] = (t.get("acc"), t.get("acc_stderr"), t.get("acc_norm"),
                             t.get("acc_norm_stderr"), t.get("items"),
                             t.get("acc_mutual_info"), t.get("acc_mutual_info_stderr"))  # fmt: skip
            rows.append(row)
    return rows


def _evaluations(runs: Sequence[RunData]) -> str:
    rows = eval_rows(runs)
    if not rows:
        return ""
    base = ("run", "recipe", "data", "loss", "perplexity", "bits_per_byte")
    tasks = sorted({k for r in rows for k in r if k not in base})
    names = ("run", "evaluated under", "data", "loss", "ppl", "bits/byte",
             *(f"{t} acc / acc_norm / acc_mutual_info" for t in tasks))  # fmt: skip
    head = "".join(f"<th>{html.escape(h)}</th>" for h in names)
    body = []
    for r in rows:
        cells = [html.escape(str(r[k])) for k in ("run", "recipe", "data")]
        cells += [_fmt(r.get(k)) for k in ("loss", "perplexity", "bits_per_byte")]  # type: ignore[arg-type]
        for t in tasks:
            v = r.get(t)
            if v is None:
                cells.append("-")
                continue
            mi = "-" if v[5] is None else f"{v[5]:.3f} &plusmn; {v[6]:.3f}"
            cells.append(f"{v[0]:.3f} &plusmn; {v[1]:.3f} / {v[2]:.3f} &plusmn; {v[3]:.3f} / "
                         f"{mi} ({v[4]} items)")  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<h2>Evaluations</h2>\n<table><tr>" + head + "</tr>" + "".join(body) + "</table>"
            '\n<p class="note">From each run\'s eval.json (<code>mxfp8 eval</code>): loss in '
            "nats per token over consecutive validation windows; task scores as lm-eval "
            "scores multiple choice, &plusmn; one standard error.</p>")  # fmt: skip


def _layer_recipes(runs: Sequence[RunData]) -> str:
    """Which recipe each linear layer ran at the end of each run (per-layer overrides,
    kept blocks, adaptive switches): one row per (run, recipe) with its layers."""
    rows = []
    for run in runs:
        layers = run.summary.get("layer_recipes") or {}
        groups: dict[str, list[str]] = {}
        for name, rec in layers.items():
            groups.setdefault(str(rec), []).append(str(name))
        for rec, names in groups.items():
            shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)"
                                              if len(names) > 12 else "")  # fmt: skip
            rows.append(f"<tr><td>{html.escape(run.name)}</td><td>{html.escape(rec)}</td>"
                        f"<td>{len(names)}</td>"
                        f"<td style='text-align:left'>{html.escape(shown)}</td></tr>")  # fmt: skip
    if not rows:
        return ""
    return ("<h2>Layer recipes</h2>\n<table><tr><th>run</th><th>recipe</th><th>layers</th>"
            "<th>which</th></tr>" + "".join(rows) + "</table>"
            '\n<p class="note">At the end of each run (summary.json): per-layer overrides, '
            "kept first/last blocks and adaptive switches to bf16 included.</p>")  # fmt: skip


def _events(runs: Sequence[RunData]) -> str:
    items = []
    for run in runs:
        for ev in run.events:
            layers = ev.get("layers") or []
            names = ", ".join(
                str(x.get("layer", x)) if isinstance(x, dict) else str(x) for x in layers[:5]
            )
            items.append(
                f"<tr><td>{html.escape(run.name)}</td><td>{html.escape(str(ev.get('step')))}</td>"
                f"<td>{html.escape(str(ev.get('kind')))}</td><td>{_fmt(ev.get('loss'))}</td>"
                f"<td>{_fmt(ev.get('baseline'))}</td>"
                f"<td style='text-align:left'>{html.escape(names) or '&ndash;'}</td></tr>"
            )
    if not items:
        return "<p>No loss spike or NaN was flagged.</p>"
    head = (
        "<tr><th>run</th><th>step</th><th>kind</th><th>loss</th><th>baseline</th>"
        "<th>layers whose numerics changed most</th></tr>"
    )
    return f"<table>{head}{''.join(items)}</table>"


def _figure(plot: Plot, stem: str) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    title = html.escape(plot.title)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{title}">'
        f"<figcaption>{title} (<code>{PLOTS_DIR}/{html.escape(stem)}.png</code>)"
        "</figcaption></figure>"
    )


def _configs(runs: Sequence[RunData]) -> str:
    parts = []
    for run in runs:
        text = run.config_text or "(no config.toml)"
        parts.append(
            f"<details><summary>{html.escape(run.name)}</summary>"
            f"<pre>{html.escape(text)}</pre></details>"
        )
    return "".join(parts)


def render_html(runs: Sequence[RunData], plots: Sequence[Plot], title: str,
                margin: float | None = None) -> str:  # fmt: skip
    """The report page as a string (no I/O); ``margin`` (in %, a multi-seed comparison's
    ``--margin``) adds the equivalence table."""
    figures = [_figure(p, _safe_stem(p.name)) for p in plots]
    overview = [f for p, f in zip(plots, figures, strict=True) if p.name in ("loss", "gap")]
    numerics = [f for p, f in zip(plots, figures, strict=True) if p.name not in ("loss", "gap")]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    gap_note = (
        "Gaps are relative to the bf16 run: (run &minus; bf16) / bf16; positive is worse. "
        "Green: final validation loss within 1 % of bf16; red: further."
        if baseline(runs)
        else "No bf16 run here, so no gap is shown."
    )
    multi = is_multi_seed(runs)
    if multi and baseline(runs):
        gap_note = gap_note.replace("the bf16 run:", "the bf16 run of the same seed:")
    numerics_html = "".join(numerics) or (
        "<p>No numerics telemetry in these runs (bf16 only, or telemetry off: set "
        "<code>run.telemetry_every</code>).</p>"
    )
    if multi and numerics:
        numerics_html = ('<p class="note">The first seed of each recipe; every seed\'s '
                         "<code>numerics.jsonl</code> is in its run directory.</p>"
                         + numerics_html)  # fmt: skip
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Generated {stamp} by <code>mxfp8 report</code> from {len(runs)} run
director{"y" if len(runs) == 1 else "ies"}.</p>
<h2>Summary</h2>
{seed_table(runs, margin) if multi else ""}{_table(runs)}
<p class="note">{gap_note}</p>
<h2>Loss</h2>
{"".join(overview) or "<p>No metrics logged yet.</p>"}
{_evaluations(runs)}
{_layer_recipes(runs)}
<h2>Divergence flags</h2>
{_events(runs)}
<h2>Numerics telemetry</h2>
{numerics_html}
<h2>Configs</h2>
{_configs(runs)}
<script>{_SCRIPT}</script>
</body>
</html>
"""


def comparison_margin(directory: Path) -> float | None:
    """The equivalence margin (in %) that ``mxfp8 compare --margin`` recorded in the
    comparison's ``comparison.json``, if any (then the report shows the equivalence table)."""
    try:
        margin = json.loads((directory / COMPARISON_INDEX).read_text()).get("margin")
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return check_margin(margin)
    except ValueError:  # absent, or not a margin compare could have written
        return None


def write_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` and ``plots/*.png`` for a run or comparison directory.

    Returns the path of the HTML file (``DIR/report.html`` unless ``out`` is given). The
    file is written to a temporary name then renamed, so a browser never sees half a page.
    """
    directory = Path(directory)
    runs = load_runs(directory)
    plots = all_plots(runs)
    out_path = Path(out) if out is not None else directory / REPORT_NAME
    plot_dir = out_path.parent / PLOTS_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        (plot_dir / f"{_safe_stem(plot.name)}.png").write_bytes(plot.png)
    title = (
        f"mxfp8 run: {runs[0].name}"
        if len(runs) == 1
        else f"mxfp8 comparison: {', '.join(r.name for r in runs)}"
    )
    if is_multi_seed(runs):
        seeds = sorted({r.seed for r in runs if r.seed is not None})
        title = (f"mxfp8 comparison: {', '.join(by_recipe(runs))} "
                 f"(seeds {', '.join(map(str, seeds))})")  # fmt: skip
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(render_html(runs, plots, title, comparison_margin(directory)), encoding="utf-8")
    os.replace(tmp, out_path)
    return out_path


def all_plots(runs: Sequence[RunData]) -> list[Plot]:
    """Every figure the report shows, in reading order. In a multi-seed comparison: loss and
    gap curves over seeds, and the numerics of each recipe's first seed only (one set of
    heatmaps per recipe, not per run)."""
    if is_multi_seed(runs):
        plots = [loss_curves_over_seeds(runs), gap_curves_over_seeds(runs)]
        runs = [group[0] for group in by_recipe(runs).values()]
    else:
        plots = [loss_curves(runs), gap_curves(runs)]
    for run in runs:
        plots.extend(numerics_heatmap(run, m) for m in HEATMAP_METRICS)
        plots.append(scale_histograms(run))
        plots.append(tensorwise_scales(run))
    return [p for p in plots if p is not None]
