"""Divergence detection: flag a loss spike or a non-finite loss against a running baseline.

Baseline: an exponential moving average of the loss, and an EMA of the absolute deviation
from it (a robust spread: one outlier moves it by ``1 - decay`` of its size, not by its
square). A step is a *spike* when, after a warm-up,

    loss - baseline > max(sigmas * spread, min_rel * |baseline|)

so noise never trips it (``sigmas`` spreads) and a flat, noise-free curve needs a real jump
(``min_rel``). A *nan* event is a NaN or infinite loss. Consecutive flagged steps form one
event (flagged at its onset); while a spike lasts the baseline absorbs only the threshold,
not the spike, so a blow-up does not teach the detector that blow-ups are normal, yet a loss
that settles at a new level is accepted after a while.

Each event names the layers whose numerics changed most between the last two telemetry
records up to that step (see :func:`rank_layer_changes`), is appended to ``events.jsonl`` and
logged as a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mxfp8.stats.jsonl import append_rows, read_rows, truncate_after
from mxfp8.stats.telemetry import NUMERICS_FILE

EVENTS_FILE = "events.jsonl"
METRICS_FILE = "metrics.jsonl"  # written by the training loop (docs/architecture.md)
SQNR_DB_PER_BIT = 20 * math.log10(2)  # 6.02 dB: one bit of precision

log = logging.getLogger(__name__)


def _opt(default: float | int, help: str) -> Any:  # noqa: A002 - as mxfp8.config.fields.opt
    """A field with its help text (read by ``mxfp8 train --help``; train is a higher floor,
    so its ``opt`` helper is not imported here)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DivergenceConfig:
    """Thresholds of the spike detector: the ``[divergence]`` section of the run config
    (defaults suit LLM pre-training loss curves)."""

    ema_decay: float = _opt(0.95, "decay of the loss baseline (EMA): it remembers about "
                            "1 / (1 - decay) steps")  # fmt: skip
    sigmas: float = _opt(6.0, "a spike exceeds the baseline by more than sigmas times the "
                         "running spread of the loss ...")  # fmt: skip
    min_rel: float = _opt(0.1, "... and by more than min_rel times the baseline")
    warmup_steps: int = _opt(20, "steps before any spike is flagged (a NaN loss always is)")
    top_layers: int = _opt(5, "layers whose numerics changed most, listed per event")

    def __post_init__(self) -> None:
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"divergence.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.sigmas <= 0 or self.min_rel < 0:
            raise ValueError(f"divergence.sigmas must be > 0 and divergence.min_rel >= 0, got "
                             f"{self.sigmas}, {self.min_rel}")  # fmt: skip
        if self.warmup_steps < 0 or self.top_layers < 0:
            raise ValueError(
                f"divergence.warmup_steps and divergence.top_layers must be >= 0, got "
                f"{self.warmup_steps}, {self.top_layers}"
            )


@dataclass(frozen=True)
class DivergenceEvent:
    step: int
    kind: str  # "spike", "nan", or "skip" (an update skipped for a non-finite loss/gradient)
    loss: float | None  # None when not finite (JSON has no NaN)
    baseline: float | None
    threshold: float | None
    layers: list[dict[str, Any]]
    detail: dict[str, Any] | None = None  # "skip": what was non-finite, and where

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SpikeDetector:
    """The running baseline; :meth:`update` returns the kind of a new event, or None."""

    def __init__(self, config: DivergenceConfig | None = None) -> None:
        self.config = config or DivergenceConfig()
        self.baseline: float | None = None
        self.spread = 0.0
        self.seen = 0
        self.in_event = False
        self.threshold: float | None = None

    _STATE = ("baseline", "spread", "seen", "in_event", "threshold")

    def state_dict(self) -> dict[str, Any]:
        """The running baseline, exactly (Python floats): what a resume needs to flag the
        same steps as the uninterrupted run."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._STATE:
            setattr(self, k, state[k])

    def update(self, loss: float) -> str | None:
        c = self.config
        if not math.isfinite(loss):
            kind = None if self.in_event else "nan"
            self.in_event = True
            return kind
        self.seen += 1
        if self.baseline is None:
            self.baseline = loss
            return None
        self.threshold = max(c.sigmas * self.spread, c.min_rel * abs(self.baseline))
        excess = loss - self.baseline
        spike = self.seen > c.warmup_steps and excess > self.threshold
        # a spike feeds the baseline only up to the threshold (see the module docstring)
        seen_loss = self.baseline + self.threshold if spike else loss
        dev = abs(seen_loss - self.baseline)
        self.baseline = c.ema_decay * self.baseline + (1 - c.ema_decay) * seen_loss
        self.spread = c.ema_decay * self.spread + (1 - c.ema_decay) * dev
        kind = "spike" if spike and not self.in_event else None
        self.in_event = spike
        return kind


def _change_score(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, dict]:
    """How much one operand's numerics moved, in "bits": |log2 amax ratio| + |dSQNR| / 6.02
    + the increase in saturated and flushed percentages (points)."""
    score, detail = 0.0, {}
    a0, a1 = before.get("amax"), after.get("amax")
    if isinstance(a0, int | float) and isinstance(a1, int | float) and a0 > 0 and a1 > 0:
        score += abs(math.log2(a1 / a0))
        detail["amax_ratio"] = round(a1 / a0, 4)
    s0, s1 = before.get("sqnr_db"), after.get("sqnr_db")
    if isinstance(s0, int | float) and isinstance(s1, int | float):
        score += abs(s1 - s0) / SQNR_DB_PER_BIT
        detail["sqnr_change_db"] = round(s1 - s0, 3)
    for key in ("saturated_pct", "underflow_pct", "nonfinite_pct"):
        v0, v1 = before.get(key), after.get(key)
        if isinstance(v0, int | float) and isinstance(v1, int | float) and v1 > v0:
            score += v1 - v0
            detail[key.replace("_pct", "_change_pct")] = round(v1 - v0, 4)
    if after.get("amax") is None or after.get("nonfinite_pct"):  # became non-finite: top
        score = math.inf
    return score, detail


def rank_layer_changes(
    rows: Sequence[dict[str, Any]], step: int, top: int = 5
) -> list[dict[str, Any]]:
    """The operands whose numerics changed most between the last two telemetry steps at or
    before ``step``; with only one telemetry step, those with the worst SQNR."""
    steps = sorted({int(r["step"]) for r in rows if int(r.get("step", 0)) <= step})
    if not steps or top == 0:
        return []
    key = lambda r: (r.get("layer"), r.get("gemm"), r.get("operand"))  # noqa: E731
    last = {key(r): r for r in rows if int(r["step"]) == steps[-1]}
    ranked: list[tuple[float, dict[str, Any]]] = []
    if len(steps) == 1:
        for (layer, gemm, operand), r in last.items():
            sqnr = r.get("sqnr_db")
            score = -sqnr if isinstance(sqnr, int | float) else math.inf
            ranked.append((score, {"layer": layer, "gemm": gemm, "operand": operand,
                                   "sqnr_db": sqnr, "from_step": steps[-1]}))  # fmt: skip
    else:
        prev = {key(r): r for r in rows if int(r["step"]) == steps[-2]}
        for k, r in last.items():
            if k not in prev:
                continue
            score, detail = _change_score(prev[k], r)
            layer, gemm, operand = k
            ranked.append((score, {"layer": layer, "gemm": gemm, "operand": operand,
                                   "score": None if math.isinf(score) else round(score, 4),
                                   "from_step": steps[-2], "to_step": steps[-1],
                                   **detail}))  # fmt: skip
    ranked.sort(key=lambda t: -t[0])
    return [d for _, d in ranked[:top]]


class DivergenceHook:
    """Training hook (``TrainHook`` protocol of ``mxfp8.train.loop``, by duck typing).

    ``telemetry``: a callable returning telemetry records; by default the run's
    ``numerics.jsonl`` is read, only when an event fires (so it costs nothing otherwise).
    The detector's state is checkpointed (``state_key``), so a resumed run flags exactly the
    steps the uninterrupted run flags.
    """

    state_key = "divergence"

    def __init__(
        self,
        run_dir: str | Path | None,
        config: DivergenceConfig | None = None,
        telemetry: Callable[[], Sequence[dict[str, Any]]] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.detector = SpikeDetector(config)
        self.telemetry = telemetry
        self.events: list[DivergenceEvent] = []

    def on_train_start(self, ctx: Any) -> None:
        """On resume: forget events past the checkpoint and restore the detector's state from
        it. A checkpoint written before that state was stored gets the baseline rebuilt from
        the losses logged up to it (every ``log_every`` steps: close to, not exactly, the
        uninterrupted baseline), with a warning."""
        start = int(getattr(ctx, "start_step", 0))
        saved = (getattr(ctx, "hook_state", None) or {}).get(self.state_key)
        if start > 0 and saved is not None:
            self.detector.load_state_dict(saved["detector"])
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / EVENTS_FILE).touch()  # present and empty: detection ran, no event
        truncate_after(self.run_dir / EVENTS_FILE, start)
        self.events = [
            DivergenceEvent(**{k: r.get(k) for k in DivergenceEvent.__dataclass_fields__})
            for r in read_rows(self.run_dir / EVENTS_FILE)
            if r.get("kind") != "precision"  # the adaptive recipe's switches share the file
        ]
        if start > 0 and saved is None:
            log.warning("the checkpoint at step %d predates checkpointed divergence state: "
                        "the loss baseline is rebuilt from the logged losses (approximate)",
                        start)  # fmt: skip
            for row in read_rows(self.run_dir / METRICS_FILE):
                loss = row.get("loss")
                if int(row.get("step", 0)) <= start and isinstance(loss, int | float):
                    self.detector.update(float(loss))

    def on_step_start(self, step: int) -> None: ...

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        loss = metrics.get("loss")
        if not isinstance(loss, int | float):
            return
        kind = self.detector.update(float(loss))
        if kind is not None:
            self.flag(step, kind, float(loss))
        if metrics.get("nonfinite"):  # the loop skipped this step's update (see train.step)
            detail = {"nonfinite": metrics["nonfinite"], "module": metrics.get("nonfinite_module")}
            self.flag(step, "skip", float(loss), detail)

    def flag(
        self, step: int, kind: str, loss: float, detail: dict[str, Any] | None = None
    ) -> DivergenceEvent:
        rows = self._telemetry_rows()
        d = self.detector
        finite = lambda x: x if x is not None and math.isfinite(x) else None  # noqa: E731
        event = DivergenceEvent(
            step=step,
            kind=kind,
            loss=finite(loss),
            baseline=finite(d.baseline),
            threshold=finite(d.threshold),
            layers=rank_layer_changes(rows, step, d.config.top_layers),
            detail=detail,
        )
        self.events.append(event)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            append_rows(self.run_dir / EVENTS_FILE, [event.to_json()])
        names = ", ".join(f"{x['layer']} ({x['gemm']}/{x['operand']})" for x in event.layers)
        what = {"spike": "loss spike", "nan": "non-finite loss"}.get(kind, "update skipped")
        log.warning(
            "step %d: %s (loss %s, baseline %s)%s", step, what,
            f"{loss:.4g}", "n/a" if d.baseline is None else f"{d.baseline:.4g}",
            f"; numerics changed most in: {names}" if names else "",
        )  # fmt: skip
        return event

    def _telemetry_rows(self) -> Sequence[dict[str, Any]]:
        if self.telemetry is not None:
            return self.telemetry()
        return read_rows(self.run_dir / NUMERICS_FILE) if self.run_dir is not None else []

    def on_train_end(self, result: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict()}

    def summary(self) -> dict[str, Any]:
        """``diverged``: at the end the loss is non-finite or in a spike that has not
        recovered. A spike, or a skipped non-finite step, that the run recovered from is
        counted in ``divergence_events`` only."""
        return {
            "diverged": self.detector.in_event,
            "divergence_events": len(self.events),
        }


def make_hook(cfg: Any, run_dir: str | Path) -> DivergenceHook:
    """The hook ``mxfp8.train.loop`` installs on every run, with ``cfg.divergence``."""
    return DivergenceHook(run_dir, cfg.divergence)
