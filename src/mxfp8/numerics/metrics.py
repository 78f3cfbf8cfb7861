"""How much MX quantization hurts one tensor: SQNR, saturation, underflow, scale exponents.

Shared by ``mxfp8 quantize-stats`` and usable by telemetry: one function, one frozen
result type, all counts exact (computed from the same quantize/dequantize the layers use).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from mxfp8.numerics import kernels
from mxfp8.numerics.formats import E8M0_NAN, ElemFormat, ScaleRule, as_format
from mxfp8.numerics.quantize import quantize
from mxfp8.numerics.tensor import MXTensor

__all__ = ["QuantStats", "mx_quant_stats", "expand_scale"]


@dataclass(frozen=True)
class QuantStats:
    """MX quantization error statistics of one tensor under one format and rule.

    Attributes:
        fmt, rule: what was measured.
        sqnr_db: 10 log10(sum x^2 / sum (x - q)^2) over the finite elements; ``None`` when
            the quantization was exact (no error).
        saturated_pct: % of finite elements whose scaled magnitude exceeded max_finite
            (clipped; always 0 under rceil).
        underflow_pct: % of finite non-zero elements that came back as zero.
        nonfinite_blocks: blocks holding NaN/Inf (their scale is NaN).
        scale_exp_hist: {unbiased scale exponent: number of finite blocks}.
    """

    fmt: str
    rule: str
    sqnr_db: float | None
    saturated_pct: float
    underflow_pct: float
    nonfinite_blocks: int
    scale_exp_hist: dict[int, int]

    def to_dict(self) -> dict:
        return asdict(self)


def expand_scale(t: MXTensor) -> torch.Tensor:
    """Each element's block scale as fp32, in the data's shape (NaN for NaN blocks)."""
    scale = kernels.scale_bits_to_float(t.scale.view(torch.uint8))
    full = scale.repeat_interleave(t.block_size, dim=t.dim)
    return full.narrow(t.dim, 0, t.data.shape[t.dim])


def mx_quant_stats(
    x: torch.Tensor,
    fmt: ElemFormat | str,
    rule: ScaleRule | str,
    *,
    block_size: int = 32,
    dim: int = -1,
) -> QuantStats:
    """Quantize ``x`` (zero-padding a partial last block) and measure what was lost."""
    fmt, rule = as_format(fmt), ScaleRule.parse(rule)
    x32 = x.detach().float()
    if x32.dim() == 0:
        x32 = x32.reshape(1)
    t = quantize(x32, fmt, block_size=block_size, dim=dim, scale_rule=rule, pad=True)
    deq = t.dequantize(torch.float32)
    finite = x32.isfinite()
    n_finite = int(finite.sum())
    xf = x32[finite].double()
    err = (xf - deq[finite].double()).pow(2).sum().item()
    signal = xf.pow(2).sum().item()
    sqnr = None if err == 0 else 10 * math.log10(signal / err)  # err > 0 implies signal > 0
    scale = expand_scale(t)
    saturated = finite & (x32.abs() > fmt.max_finite * scale)
    nonzero = finite & (x32 != 0)
    underflow = nonzero & (deq == 0)
    bits = t.scale.view(torch.uint8)
    finite_blocks = bits != E8M0_NAN
    exps, counts = torch.unique(bits[finite_blocks].to(torch.int32) - 127, return_counts=True)
    return QuantStats(
        fmt=fmt.name,
        rule=rule.value,
        sqnr_db=sqnr,
        saturated_pct=100.0 * int(saturated.sum()) / max(n_finite, 1),
        underflow_pct=100.0 * int(underflow.sum()) / max(int(nonzero.sum()), 1),
        nonfinite_blocks=int((~finite_blocks).sum()),
        scale_exp_hist={
            int(e): int(c) for e, c in zip(exps.tolist(), counts.tolist(), strict=True)
        },
    )
