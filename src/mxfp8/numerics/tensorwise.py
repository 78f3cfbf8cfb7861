"""Per-tensor FP8 (the classic Hopper-era recipes): current and delayed scaling.

One fp32 scale for the whole tensor, applied *before* the cast:
``data = saturate(x * scale)`` and ``x ~= data / scale``. Current scaling takes
``scale = dest_max / amax(x)``; delayed scaling takes it from a history of past amaxes
(cheaper on GPUs, but an outlier saturates until the history catches up).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from mxfp8.numerics.formats import E4M3, ElemFormat, as_format, check_float_input

__all__ = ["TensorwiseFP8", "quantize_tensorwise", "AmaxReduce", "DelayedScaling", "amax_of"]

_F32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class TensorwiseFP8:
    """A per-tensor-scaled FP8 tensor.

    Attributes:
        data: FP8 elements, the source shape; NaN codes where the source was NaN or Inf.
        scale: fp32 0-d tensor, the factor applied before the cast.
        amax: fp32 0-d tensor, max |x| of the source (NaN/Inf if it held one); feed it to
            :meth:`DelayedScaling.update`.
        fmt: the element format.
    """

    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    fmt: ElemFormat

    @property
    def scale_inv(self) -> torch.Tensor:
        """1 / scale: the dequantization factor GEMM kernels (``_scaled_mm``) expect."""
        return self.scale.reciprocal()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() / self.scale).to(dtype)


def amax_of(x: torch.Tensor) -> torch.Tensor:
    """max |x| as an fp32 0-d tensor (NaN if x holds a NaN, 0 for an empty x)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x)  # one read, no |x| temporary
    return torch.maximum(hi, -lo).float()


def current_scale(amax: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """dest_max / amax; 1 when amax is 0 or not finite; capped at the largest fp32."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    ok = torch.isfinite(amax) & (amax > 0)
    scale = fmt.max_finite / torch.where(ok, amax, 1.0)
    return torch.where(ok, scale.clamp(max=_F32_MAX), 1.0)


def quantize_tensorwise(
    x: torch.Tensor, fmt: ElemFormat | str = E4M3, scale: torch.Tensor | float | None = None
) -> TensorwiseFP8:
    """Per-tensor FP8: ``data = saturate(RNE(x * scale))``.

    ``scale=None`` is current scaling (``dest_max / amax``; 1 for an all-zero tensor). If x
    holds NaN or Inf, its amax is non-finite, the current scale falls back to 1, and those
    elements become FP8 NaN (never a finite number); finite elements still saturate.
    """
    check_float_input(x)
    fmt = as_format(fmt)
    amax = amax_of(x)
    if scale is None:
        scale_t = current_scale(amax, fmt)
    else:
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    y = x.float() * scale_t  # in fp32: a 0-d scale would not promote a bf16 x
    y = y.clamp_(-fmt.max_finite, fmt.max_finite)  # saturate: E5M2 casts do not
    if not bool(torch.isfinite(amax)):
        y.masked_fill_(~torch.isfinite(x), float("nan"))  # clamp turned Inf into max_finite
    return TensorwiseFP8(y.to(fmt.torch_dtype), scale_t, amax, fmt)


class AmaxReduce(StrEnum):
    """How :class:`DelayedScaling` turns its amax history into one amax.

    - ``MAX``: the largest amax of the last ``history_len`` steps (TransformerEngine's default).
    - ``EMA``: ``ema = decay * ema + (1 - decay) * amax`` over every recorded step,
      started at the first amax.
    """

    MAX = "max"
    EMA = "ema"


class DelayedScaling:
    """Per-tensor scale from past amaxes: ``scale() = dest_max / reduce(history)``.

    Usage per step: ``q = quantize_tensorwise(x, fmt, tracker.scale())`` then
    ``tracker.update(q.amax)``, or simply ``q = tracker.quantize(x)``. With an empty history
    ``scale()`` is 1.0 and :meth:`quantize` uses current scaling instead. Non-finite amaxes
    (a NaN step the loss scaler will skip) are not recorded; ``skipped`` counts them.
    """

    def __init__(
        self,
        fmt: ElemFormat | str = E4M3,
        history_len: int = 16,
        reduce: AmaxReduce | str = AmaxReduce.MAX,
        ema_decay: float = 0.9,
    ) -> None:
        if isinstance(history_len, bool) or not isinstance(history_len, int) or history_len < 1:
            raise ValueError(f"history_len must be a positive integer, got {history_len!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.fmt = as_format(fmt)
        self.history_len = history_len
        self.reduce = AmaxReduce(reduce.lower() if isinstance(reduce, str) else reduce)
        self.ema_decay = float(ema_decay)
        self._history = torch.zeros(history_len, dtype=torch.float32)  # most recent first
        self._ema = torch.zeros((), dtype=torch.float32)
        self.count = 0  # amaxes recorded so far
        self.skipped = 0  # non-finite amaxes not recorded

    @property
    def amax_history(self) -> torch.Tensor:
        """The recorded amaxes, most recent first (at most ``history_len``)."""
        return self._history[: min(self.count, self.history_len)]

    def reduced_amax(self) -> torch.Tensor:
        """The amax the next scale is computed from (0 when nothing was recorded)."""
        if self.count == 0:
            return torch.zeros((), dtype=torch.float32, device=self._history.device)
        if self.reduce is AmaxReduce.MAX:
            return self.amax_history.max()
        return self._ema.clone()

    def scale(self) -> torch.Tensor:
        """fp32 0-d scale for the next quantization (1.0 while the history is empty)."""
        return current_scale(self.reduced_amax(), self.fmt)

    def update(self, amax: torch.Tensor | float) -> None:
        """Record one step's observed amax."""
        amax = torch.as_tensor(amax, dtype=torch.float32).to(self._history.device).reshape(())
        if not bool(torch.isfinite(amax)):
            self.skipped += 1
            return
        self._history = torch.cat([amax.reshape(1), self._history[:-1]])
        if self.count == 0:
            self._ema = amax.clone()
        else:
            self._ema = self.ema_decay * self._ema + (1.0 - self.ema_decay) * amax
        self.count += 1

    def quantize(self, x: torch.Tensor) -> TensorwiseFP8:
        """Quantize with the delayed scale (current scaling on the first step), then record."""
        q = quantize_tensorwise(x, self.fmt, None if self.count == 0 else self.scale())
        self.update(q.amax)
        return q

    def state_dict(self) -> dict[str, Any]:
        return {
            "fmt": self.fmt.name,
            "history_len": self.history_len,
            "reduce": self.reduce.value,
            "ema_decay": self.ema_decay,
            "amax_history": self._history.clone(),
            "ema": self._ema.clone(),
            "count": self.count,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpointed state; the configuration must match this tracker's."""
        mine = (self.fmt.name, self.history_len, self.reduce.value, self.ema_decay)
        theirs = (state["fmt"], state["history_len"], state["reduce"], state["ema_decay"])
        if mine != theirs:
            raise ValueError(f"DelayedScaling config mismatch: have {mine}, state has {theirs}")
        self._history = state["amax_history"].detach().clone().float()
        self._ema = state["ema"].detach().clone().float().reshape(())
        self.count = int(state["count"])
        self.skipped = int(state["skipped"])

    def __repr__(self) -> str:
        return (
            f"DelayedScaling(fmt={self.fmt!r}, history_len={self.history_len}, "
            f"reduce={self.reduce.value!r}, ema_decay={self.ema_decay}, count={self.count})"
        )
