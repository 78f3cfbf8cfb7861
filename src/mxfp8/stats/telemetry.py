"""Numerics telemetry: per layer, per GEMM, per operand, on chosen steps only.

Every ``MXLinear`` calls ``layer.observer(layer, gemm, operand, hp, q)`` for each operand it
quantizes when an observer is set (and costs nothing when it is not). A
:class:`TelemetryCollector` sets that observer on every MXLinear of a model for one step,
measures each operand (:mod:`mxfp8.stats.operand_stats`), then removes it again, so the
other steps run at full speed.

One record per (layer, gemm, operand) per telemetry step: the first call of the step (the
first micro-batch; later micro-batches and the evaluation forward are not measured twice).
A layer's observer removes itself as soon as its six operands are measured, so the rest of
the step takes the fast path (weight cache, fused quantization).

Attention modules with quantized BMMs (``bmm_recipe`` set by ``convert_model``,
:mod:`mxfp8.layers.attention_bmm`) are observed the same way: one record per gemm (``qk``,
``qk_dgrad``, ``qk_wgrad``, ``pv``, ``pv_dgrad``, ``pv_wgrad``) and operand, 12 per module,
under the module's name (``layers.0.attention``).

:class:`TelemetryHook` plugs this into ``mxfp8.train.loop.train`` (which finds it through
:func:`make_hook` when ``run.telemetry_every > 0``) and appends the records to
``numerics.jsonl`` (schema in docs/architecture.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxfp8.layers.attention_bmm import OPERANDS_PER_MODULE as BMM_OPERANDS
from mxfp8.layers.linear import MXLinear
from mxfp8.stats.jsonl import append_rows, truncate_after
from mxfp8.stats.operand_stats import RawStats, finalize, operand_stats

NUMERICS_FILE = "numerics.jsonl"
OPERANDS_PER_LAYER = 6  # 3 GEMMs x 2 operands

log = logging.getLogger(__name__)


def quantized_layers(model: nn.Module) -> list[MXLinear]:
    """The model's MXLinear modules that quantize (bf16-recipe layers have nothing to see)."""
    return [m for m in model.modules() if isinstance(m, MXLinear) and m.recipe.quantized]


def quantized_attention(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules whose BMMs are MX-quantized (``bmm_recipe`` set)."""
    return [m for m in model.modules() if getattr(type(m), "supports_quantized_bmm", False)
            and getattr(m, "bmm_recipe", None) is not None]  # fmt: skip


def _layer_name(layer: MXLinear, fallback: str) -> str:
    return getattr(layer, "name", "") or fallback


class TelemetryCollector:
    """Measures the quantized operands of a model's MXLinear layers during one step.

    Usage::

        collector = TelemetryCollector(model)
        with collector.capture(step):
            loss = model(x, y)[1]; loss.backward()
        rows = collector.take()  # list of numerics.jsonl records

    Only one capture at a time; capturing sets ``layer.observer`` on each layer and restores
    the previous value (normally None) afterwards, even on error.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = quantized_layers(model) + quantized_attention(model)
        fqn = {id(m): n for n, m in model.named_modules()}
        self._names = {id(m): _layer_name(m, fqn.get(id(m), "?")) for m in self.layers}
        self._raw: dict[tuple[str, str, str], RawStats] = {}
        self._step: int | None = None
        self._saved: dict[int, Any] = {}
        self._rows: list[dict[str, Any]] = []

    @property
    def active(self) -> bool:
        return self._step is not None

    def start(self, step: int) -> None:
        if self.active:
            raise RuntimeError("telemetry capture already active")
        self._step = step
        self._raw = {}
        for layer in self.layers:
            self._saved[id(layer)] = layer.observer
            layer.observer = self._observe

    def stop(self) -> list[dict[str, Any]]:
        """Detach everywhere and turn this step's measurements into records."""
        if not self.active:
            return []
        for layer in self.layers:
            if layer.observer == self._observe:
                layer.observer = self._saved.get(id(layer))
        self._saved = {}
        step, self._step = self._step, None
        rows = []
        for (layer, gemm, operand), raw in self._raw.items():
            rows.append(
                {"step": step, "layer": layer, "gemm": gemm, "operand": operand, **finalize(raw)}
            )
        self._raw = {}
        self._rows.extend(rows)
        return rows

    @contextmanager
    def capture(self, step: int) -> Iterator[TelemetryCollector]:
        self.start(step)
        try:
            yield self
        finally:
            self.stop()

    def take(self) -> list[dict[str, Any]]:
        """Records of all captures since the last ``take``."""
        rows, self._rows = self._rows, []
        return rows

    def _observe(self, layer: MXLinear, gemm: str, operand: str, hp: torch.Tensor, q) -> None:
        name = self._names.get(id(layer), getattr(layer, "name", "") or "?")
        key = (name, gemm, operand)
        if key in self._raw:  # a later micro-batch or the eval forward: measured already
            return
        raw = operand_stats(hp.detach(), q)
        raw.amax_history = _amax_history(layer, operand)
        self._raw[key] = raw
        if isinstance(layer, MXLinear):  # high-precision GEMMs quantize no operands
            expected = OPERANDS_PER_LAYER - 2 * len(layer.recipe.hp_gemms)
        else:
            expected = BMM_OPERANDS
        if sum(1 for k in self._raw if k[0] == name) >= expected:
            layer.observer = self._saved.get(id(layer))  # done: back to the fast path


def _amax_history(layer: MXLinear, operand: str) -> list[float] | None:
    """Delayed scaling's amax history of this operand, most recent first (None otherwise)."""
    state = getattr(layer, "delayed_state", None)
    if state is None:
        return None
    tracker = state.trackers.get(operand)
    if tracker is None:
        return None
    return [float(f"{a:.6g}") for a in tracker.amax_history.tolist()]


class TelemetryHook:
    """Training hook: capture telemetry every ``every`` steps, append to ``numerics.jsonl``.

    Implements the ``TrainHook`` protocol of ``mxfp8.train.loop`` by duck typing (the stats
    floor does not import the training floor). ``latest`` holds the records of the last
    telemetry step, for :mod:`mxfp8.stats.divergence`. The count of telemetry steps is
    checkpointed (``state_key``), so a resumed run's summary matches an uninterrupted one.
    """

    state_key = "telemetry"

    def __init__(self, every: int, run_dir: str | Path | None) -> None:
        if every < 1:
            raise ValueError(f"telemetry interval must be >= 1, got {every}")
        self.every = every
        self.path = Path(run_dir) / NUMERICS_FILE if run_dir is not None else None
        self.collector: TelemetryCollector | None = None
        self.latest: list[dict[str, Any]] = []
        self.steps_captured = 0

    def on_train_start(self, ctx: Any) -> None:
        start = int(getattr(ctx, "start_step", 0))
        saved = (getattr(ctx, "hook_state", None) or {}).get(self.state_key)
        if start > 0:  # an older checkpoint: count the telemetry steps up to it
            self.steps_captured = (int(saved["steps_captured"]) if saved is not None
                                   else start // self.every)  # fmt: skip
        if self.path is not None:
            truncate_after(self.path, start)
        self.collector = TelemetryCollector(ctx.model)
        if not self.collector.layers:
            log.info("telemetry: no quantized layer in this model (recipe %s)", ctx.recipe)

    def on_step_start(self, step: int) -> None:
        if self.collector is not None and self.collector.layers and step % self.every == 0:
            self.collector.start(step)

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.collector is None or not self.collector.active:
            return
        self.collector.stop()
        rows = self.collector.take()
        if not rows:
            return
        self.latest = rows
        self.steps_captured += 1
        if self.path is not None:
            append_rows(self.path, rows)

    def on_train_end(self, result: Any) -> None:
        if self.collector is not None and self.collector.active:
            self.collector.stop()
            self.collector.take()

    def summary(self) -> dict[str, Any]:
        return {"telemetry_every": self.every, "telemetry_steps": self.steps_captured}

    def state_dict(self) -> dict[str, Any]:
        return {"steps_captured": self.steps_captured}


def make_hook(cfg: Any, run_dir: str | Path) -> TelemetryHook | None:
    """The hook ``mxfp8.train.loop`` installs when ``cfg.run.telemetry_every > 0``, or when
    the recipe is adaptive (every ``recipe.adaptive_every`` steps then, if not set)."""
    every = int(getattr(cfg.run, "telemetry_every", 0))
    section = getattr(cfg, "recipe", None)
    rec = section.build() if section is not None else None
    if every == 0 and getattr(rec, "adaptive", False):
        every = rec.adaptive_every
    return TelemetryHook(every, run_dir) if every > 0 else None
