"""Quantization statistics of one operand: how well did FP8 represent this tensor?

Given the high-precision tensor ``hp`` and what the layer actually fed its GEMM (``q``: an
``MXTensor``, a ``TensorwiseFP8`` or a ``RowwiseFP8``), measure:

- saturated, underflow and SQNR, as :mod:`mxfp8.numerics.metrics` defines them (the one
  definition, shared with ``mxfp8 quantize-stats``): saturated counts the elements the
  saturating clamp really changed (scaled magnitude ``|hp| / 2^e`` (MX) or ``|hp| * scale``
  (per-tensor, and per-row with each row's scale) > 464 for E4M3, >= 61440 for E5M2), as a
  % of the finite elements; underflow the non-zero finite elements flushed to exactly 0, as
  a % of the non-zero finite ones;
  SQNR ``10 log10(sum hp^2 / sum (hp - deq)^2)`` in dB over the finite elements of
  non-NaN blocks, bounded to +-:data:`SQNR_CAP_DB` (+200 when exact), ``None`` (null) for
  an all-zero tensor.
- amax, the share of non-finite elements, and for MX the histogram of the E8M0 block-scale
  exponents (bits - 127; -127 also marks all-zero blocks, 128 marks NaN blocks).

Counts are computed as tensors and turned into Python numbers in one go by :func:`finalize`,
so that a GPU run pays one synchronization per telemetry step, not one per statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mxfp8.numerics.formats import E8M0_BIAS
from mxfp8.numerics.metrics import (
    SQNR_CAP_DB,
    mx_saturated,
    scaled_saturated,
    signal_noise,
    sqnr_db,
)
from mxfp8.numerics.rowwise import RowwiseFP8
from mxfp8.numerics.tensor import MXTensor
from mxfp8.numerics.tensorwise import TensorwiseFP8

__all__ = [
    "SQNR_CAP_DB",
    "RawStats",
    "finalize",
    "mx_dequantize",
    "mx_stats",
    "operand_stats",
    "rowwise_stats",
    "tensorwise_stats",
]

# order of the entries of RawStats.counts
_FIELDS = ("saturated", "underflow", "nonzero", "nonfinite", "numel", "signal", "noise", "amax")


@dataclass
class RawStats:
    """Device-side statistics of one operand, before :func:`finalize`."""

    counts: torch.Tensor  # float64 [len(_FIELDS)]
    fmt: str
    scale_bits_hist: torch.Tensor | None = None  # int64 [256], MX only
    scale: torch.Tensor | None = None  # per-tensor only
    amax_history: list[float] | None = None  # delayed scaling only, most recent first


def _oriented(hp: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    """``hp`` laid out like the quantized data.

    Layers pass ``hp`` in the orientation of the GEMM (e.g. ``x.T`` for wgrad) while a
    backend may have quantized its transpose along dim 0; a square operand fits both ways,
    so pick the orientation the dequantized values actually match.
    """
    if hp.shape == deq.shape and (hp.dim() != 2 or hp.shape[0] != hp.shape[1]):
        return hp
    if hp.dim() == 2 and hp.t().shape == deq.shape:
        if hp.shape != deq.shape:
            return hp.t()
        err = (hp.float() - deq).abs().sum()
        err_t = (hp.t().float() - deq).abs().sum()
        return hp.t() if bool(err_t < err) else hp
    if hp.numel() == deq.numel():
        return hp.reshape(deq.shape)
    raise ValueError(f"operand shape {tuple(hp.shape)} does not match {tuple(deq.shape)}")


def _common(
    x: torch.Tensor, deq: torch.Tensor, saturated: torch.Tensor, amax: torch.Tensor | None = None
) -> torch.Tensor:
    """The statistics shared by both kinds, as one float64 vector (see ``_FIELDS``).

    ``saturated`` is the (0-d) count of clipped elements, computed by the caller; ``amax``
    too when the caller already has it (NaN if x holds a NaN)."""
    n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        return torch.stack([n * 0] * 4 + [n] + [n * 0] * 3)
    if amax is None:
        lo, hi = torch.aminmax(x)
        amax = torch.maximum(hi, -lo)
    if bool(torch.isfinite(amax)):  # the usual case: no masks, few passes
        nonzero = torch.count_nonzero(x)
        # zero stays zero, so every other zero of deq is a flushed value
        underflow = nonzero - torch.count_nonzero(deq)
        signal, noise = signal_noise(x, deq, all_finite=True)
        return torch.stack(
            [saturated.double(), underflow.double(), nonzero.double(), n * 0, n, signal, noise,
             amax.double()]
        )  # fmt: skip
    finite = torch.isfinite(x)
    nonzero = finite & (x != 0)
    signal, noise = signal_noise(x, deq, all_finite=False)
    return torch.stack(
        [
            saturated.double(),
            (nonzero & (deq == 0)).sum().double(),
            nonzero.sum().double(),
            (~finite).sum().double(),
            n,
            signal,
            noise,
            torch.where(finite, x, 0).abs().max().double(),
        ]
    )


def mx_dequantize(q: MXTensor) -> torch.Tensor:
    """``q.dequantize(torch.float32)``, bit for bit, in two passes: the FP8 -> fp32 cast
    and one multiply by the block scale ``2^e`` (exact: a power of two; ``2^128`` = inf for
    a NaN block, whose elements are NaN codes, so the product stays NaN). Padded tensors
    take ``q.dequantize``."""
    dim, bs = q.dim, q.block_size
    shape = q.data.shape
    nblocks = q.scale.shape[dim] if q.data.dim() else 0
    if q.data.numel() == 0 or shape[dim] != nblocks * bs:
        return q.dequantize(torch.float32)
    outer = shape[:dim].numel() * nblocks
    inner = shape[dim + 1 :].numel()
    exps = q.scale_exponent().reshape(outer, 1, inner)
    scale = torch.ldexp(torch.ones_like(exps, dtype=torch.float32), exps)
    return (q.data.reshape(outer, bs, inner).float() * scale).reshape(shape)


@torch.no_grad()
def mx_stats(hp: torch.Tensor, q: MXTensor) -> RawStats:
    """Statistics of an MX-quantized operand (see the module docstring)."""
    deq = mx_dequantize(q)
    x = _oriented(hp, deq).float()
    saturated, block_amax = mx_saturated(x, q)  # the block amaxes also give the tensor's
    amax = block_amax.max() if block_amax.numel() else None  # max propagates NaN
    counts = _common(x, deq, saturated, amax)
    hist = torch.bincount(q.scale_bits().reshape(-1).to(torch.int64), minlength=256)
    return RawStats(counts, q.fmt.name, scale_bits_hist=hist)


@torch.no_grad()
def tensorwise_stats(hp: torch.Tensor, q: TensorwiseFP8) -> RawStats:
    """Statistics of a per-tensor FP8 operand: the quantizer computes ``x * scale`` in fp32
    and clamps it, so that is what we compare with the format max."""
    deq = q.dequantize(torch.float32)
    x = _oriented(hp, deq).float()
    scaled = x * q.scale.to(x.device)
    saturated = scaled_saturated(scaled, q.fmt)
    return RawStats(_common(x, deq, saturated), q.fmt.name, scale=q.scale.detach().float())


@torch.no_grad()
def rowwise_stats(hp: torch.Tensor, q: RowwiseFP8) -> RawStats:
    """Statistics of a per-row FP8 operand: as :func:`tensorwise_stats`, with each row's
    fp32 scale (``q.scale`` broadcasts along ``q.dim``). No single scale to report."""
    deq = q.dequantize(torch.float32)
    x = hp.float()
    if x.shape != deq.shape:
        raise ValueError(f"operand shape {tuple(x.shape)} does not match {tuple(deq.shape)}")
    saturated = scaled_saturated(x * q.scale.to(x.device), q.fmt)
    return RawStats(_common(x, deq, saturated), q.fmt.name)


def operand_stats(hp: torch.Tensor, q: Any) -> RawStats:
    """Dispatch on the kind of quantized object."""
    if isinstance(q, MXTensor):
        return mx_stats(hp, q)
    if isinstance(q, TensorwiseFP8):
        return tensorwise_stats(hp, q)
    if isinstance(q, RowwiseFP8):
        return rowwise_stats(hp, q)
    raise TypeError(f"cannot measure a {type(q).__name__}; expected MXTensor, TensorwiseFP8 "
                    "or RowwiseFP8")  # fmt: skip


def _round(x: float, digits: int = 6) -> float | None:
    """Compact, JSON-safe float: ``digits`` significant digits, None for NaN/inf."""
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def finalize(raw: RawStats) -> dict[str, Any]:
    """Python numbers of one operand, in the numerics.jsonl schema (docs/architecture.md)."""
    c = dict(zip(_FIELDS, raw.counts.tolist(), strict=True))
    finite_n = c["numel"] - c["nonfinite"]
    sqnr = sqnr_db(c["signal"], c["noise"])  # None for an all-zero tensor
    row: dict[str, Any] = {
        "fmt": raw.fmt,
        "saturated_pct": _round(100.0 * c["saturated"] / finite_n if finite_n else 0.0),
        "underflow_pct": _round(100.0 * c["underflow"] / c["nonzero"] if c["nonzero"] else 0.0),
        "sqnr_db": None if sqnr is None else _round(sqnr, 5),
        "amax": _round(c["amax"]),
        "nonfinite_pct": _round(100.0 * c["nonfinite"] / c["numel"] if c["numel"] else 0.0),
    }
    if raw.scale_bits_hist is not None:
        hist = raw.scale_bits_hist.tolist()
        row["scale_exp_hist"] = {str(b - E8M0_BIAS): n for b, n in enumerate(hist) if n}
    if raw.scale is not None:
        row["scale"] = _round(float(raw.scale))
    if raw.amax_history is not None:
        row["amax_history"] = raw.amax_history
    return row
