"""mxfp8-adaptive: switch a layer to bf16 for the rest of the run when its numerics go bad.

At every telemetry step (``run.telemetry_every``) each quantized operand's record is checked
against the recipe's thresholds: a layer with an operand above ``adaptive_max_saturated_pct``
saturated, above ``adaptive_max_underflow_pct`` flushed to zero (operands named in
``adaptive_underflow_ignore`` excepted: by default the weight gradient's output gradient), or
below ``adaptive_min_sqnr_db`` is switched to high precision after that step. With
``adaptive_on_divergence``, so is the layer a divergence event names first (the one whose
numerics changed most before a loss spike, a non-finite loss or a skipped update).

Decisions depend only on the telemetry records and events, which are deterministic for a
given run; each is applied by :func:`mxfp8.layers.precision.switch_to_high_precision`,
logged as a ``precision`` event in ``events.jsonl`` (the report lists it with the divergence
flags) and stored in every later checkpoint, so a resumed run quantizes the same layers.
On healthy numerics nothing crosses a threshold and the run is the mxfp8 run, bit for bit.
How the defaults were chosen (measured on healthy runs against runs destabilized by a high
learning rate) is in docs/recipes.md: the mxfp8 recipe never saturates, its SQNR stays above
29 dB even when training fails, and the flushed share separates the two cleanly on every
operand but the weight gradient's output gradient, which healthy runs flush up to 39 % of.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from mxfp8.layers.precision import switch_to_high_precision, switchable
from mxfp8.stats.divergence import EVENTS_FILE, DivergenceHook
from mxfp8.stats.jsonl import append_rows
from mxfp8.stats.telemetry import TelemetryHook

log = logging.getLogger(__name__)
PRECISION_EVENT = "precision"
_DIVERGENCE_KINDS = ("spike", "nan", "skip")


def crossings(rows: list[dict[str, Any]], recipe: Any) -> dict[str, str]:
    """layer -> why it crosses a threshold, from one telemetry step's records (the first
    crossing of each layer, in record order)."""
    out: dict[str, str] = {}
    for r in rows:
        layer = str(r.get("layer"))
        if layer in out:
            continue
        where = f"{r.get('gemm')}/{r.get('operand')}"
        sat, under, sqnr = r.get("saturated_pct"), r.get("underflow_pct"), r.get("sqnr_db")
        if sat is not None and sat > recipe.adaptive_max_saturated_pct:
            out[layer] = f"{where} saturated {sat:.3g} % > {recipe.adaptive_max_saturated_pct}"
        elif (under is not None and under > recipe.adaptive_max_underflow_pct
              and where not in recipe.adaptive_underflow_ignore):  # fmt: skip
            out[layer] = (f"{where} underflow {under:.3g} % > "
                          f"{recipe.adaptive_max_underflow_pct}")  # fmt: skip
        elif sqnr is not None and sqnr < recipe.adaptive_min_sqnr_db:
            out[layer] = f"{where} SQNR {sqnr:.3g} dB < {recipe.adaptive_min_sqnr_db}"
    return out


class AdaptiveHook:
    """Training hook (``TrainHook`` protocol, by duck typing) applying the policy above.
    Runs after the telemetry and divergence hooks of the same step, reading what they saw."""

    def __init__(self, recipe: Any, run_dir: str | Path | None, telemetry: TelemetryHook,
                 divergence: DivergenceHook | None) -> None:  # fmt: skip
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.telemetry = telemetry
        self.divergence = divergence
        self.modules: dict[str, nn.Module] = {}
        self._seen_events = 0
        self._seen_rows: object = None

    def on_train_start(self, ctx: Any) -> None:
        self.modules = dict(ctx.model.named_modules())
        self._seen_events = len(self.divergence.events) if self.divergence is not None else 0
        self._seen_rows = self.telemetry.latest

    def on_step_start(self, step: int) -> None: ...

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        todo: dict[str, str] = {}
        rows = self.telemetry.latest
        if rows and rows is not self._seen_rows:  # a telemetry step just ended
            self._seen_rows = rows
            todo.update(crossings(rows, self.recipe))
        if self.divergence is not None and self.recipe.adaptive_on_divergence:
            for ev in self.divergence.events[self._seen_events :]:
                if ev.kind in _DIVERGENCE_KINDS and ev.layers:
                    first = ev.layers[0]
                    layer = str(first.get("layer", first) if isinstance(first, dict) else first)
                    todo.setdefault(layer, f"divergence event ({ev.kind}) at step {ev.step} "
                                           "named it first")  # fmt: skip
            self._seen_events = len(self.divergence.events)
        switched = []
        for layer, reason in todo.items():
            module = self.modules.get(layer)
            if module is None or not switchable(module):
                continue  # already in high precision (or a name telemetry made up)
            record = switch_to_high_precision(module, step, reason)
            switched.append({"layer": layer, **record})
            log.warning("step %d: %s switched to bf16 for the rest of the run (%s)", step, layer,
                        reason)  # fmt: skip
        if switched:
            metrics["precision_switches"] = len(switched)
            if self.run_dir is not None:
                event = {"step": step, "kind": PRECISION_EVENT, "loss": metrics.get("loss"),
                         "baseline": None, "threshold": None, "layers": switched,
                         "detail": {"switched": [s["layer"] for s in switched]}}  # fmt: skip
                append_rows(self.run_dir / EVENTS_FILE, [event])

    def on_train_end(self, result: Any) -> None: ...

    def summary(self) -> dict[str, Any]:
        switched = {n: dict(m.precision_switch) for n, m in self.modules.items()
                    if getattr(m, "precision_switch", None) is not None}  # fmt: skip
        return {"precision_switches": switched}


def make_hook(cfg: Any, run_dir: str | Path, telemetry: TelemetryHook | None,
              divergence: DivergenceHook | None) -> AdaptiveHook | None:  # fmt: skip
    """The hook ``mxfp8.train.loop`` installs when the recipe is adaptive."""
    recipe = cfg.recipe.build()
    if not recipe.adaptive or telemetry is None:
        return None
    return AdaptiveHook(recipe, run_dir, telemetry, divergence)
