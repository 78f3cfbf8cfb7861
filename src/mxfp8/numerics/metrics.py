"""How much MX quantization hurts one tensor: SQNR, saturation, underflow, scale exponents.

The one definition of these statistics in the project: ``mxfp8 quantize-stats``
(:func:`mx_quant_stats`), the training telemetry (:mod:`mxfp8.stats.operand_stats`, which
feeds ``numerics.jsonl`` and the report) and the docs all use the functions below, so that a
number means the same thing wherever it is printed. The building blocks return tensors
(:func:`mx_saturated`, :func:`signal_noise`), so telemetry can keep its statistics on the
device and turn them into Python numbers once per step; :func:`sqnr_db` is the last step on
plain numbers.

Definitions:

- **saturated**: a finite element whose scaled magnitude (``|x| / 2^e`` for an MX block with
  scale ``2^e``, ``|x * scale|`` per tensor) the saturating clamp really changed, i.e. one
  that round-to-nearest-even onto the element grid extended beyond the format's max would
  have sent above ``max_finite``: scaled > 464 for E4M3 (464, halfway to the next grid point
  480, ties to the even 448) and scaled >= 61440 for E5M2 (halfway between 57344 and 65536,
  ties to the even 65536). Values in (448, 464] round to 448 anyway, so counting them would
  report rounding as clipping. Reported as a % of the finite elements. rceil never
  saturates; floor saturates the top of blocks whose amax mantissa exceeds 1.75.
- **underflow**: non-zero finite elements that came back as exactly zero, as a % of the
  non-zero finite elements.
- **SQNR**: ``10 log10(sum x^2 / sum (x - q)^2)`` in dB, both sums in float64 over the
  finite elements of blocks whose scale is a number (a NaN/Inf block is counted apart, as
  non-finite). Always a JSON-safe number or null: bounded to
  [-:data:`SQNR_CAP_DB`, :data:`SQNR_CAP_DB`], so an exact quantization (zero error, non-zero
  signal) reports +200 dB and a finite value that overflowed to inf (the top of the fp32
  range) -200 dB; an all-zero tensor (no signal, or no finite element) has no SQNR: ``None``
  (JSON null).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mxfp8.numerics.backends import eager
from mxfp8.numerics.formats import E8M0_NAN, ElemFormat, ScaleRule, as_format
from mxfp8.numerics.quantize import quantize
from mxfp8.numerics.tensor import MXTensor

__all__ = [
    "SQNR_CAP_DB",
    "QuantStats",
    "mx_quant_stats",
    "expand_scale",
    "saturation_bound",
    "mx_blocks",
    "mx_saturated",
    "scaled_saturated",
    "signal_noise",
    "sqnr_db",
]

SQNR_CAP_DB = 200.0
"""|SQNR| bound in dB: reported for an exact quantization, far above any real FP8 error
(E4M3 on Gaussian data: ~31 dB), and a finite number, so JSON and plots can hold it."""

_F32_MAN_BITS = 23


def saturation_bound(fmt: ElemFormat | str) -> float:
    """Largest scaled magnitude the saturating clamp leaves alone (an fp32 value).

    An element is saturated when its scaled magnitude is ``> saturation_bound(fmt)``: 464.0
    for E4M3 and the fp32 number just below 61440 for E5M2 (see the module docstring). At the
    midpoint max + ulp/2 round-half-to-even picks whichever neighbour has an even code:
    E4M3's max 448 is code ...110 (kept), E5M2's 57344 is ...11 (the tie goes up, past the
    max), so for E5M2 the midpoint itself is clipped. One strict bound for both lets the
    callers compare ``|x| > bound * 2^e``, exact since ``2^e`` is a power of two.
    """
    fmt = as_format(fmt)
    step = 2.0 ** (fmt.emax - fmt.man_bits)  # grid spacing at the top binade
    midpoint = fmt.max_finite + step / 2
    if int(fmt.max_finite / step) % 2 == 0:  # the tie rounds to the max: not clipped
        return midpoint
    return midpoint - 2.0 ** (fmt.emax - _F32_MAN_BITS)  # fp32 predecessor (same binade)


def mx_blocks(x: torch.Tensor, t: MXTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` laid out as ``t``'s blocks and their scale exponents.

    Returns (``x`` zero-padded to whole blocks and viewed as [outer, block_size, inner],
    int32 exponents [outer, 1, inner]; 128 for a NaN scale). ``x`` must have ``t``'s shape.
    """
    if x.shape != t.data.shape:
        raise ValueError(f"tensor shape {tuple(x.shape)} != quantized {tuple(t.data.shape)}")
    dim, bs = t.dim, t.block_size
    nblocks = t.scale.shape[dim]
    if x.shape[dim] != nblocks * bs:  # padded quantization: zeros, which never saturate
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, nblocks * bs - x.shape[dim]]
        x = F.pad(x, widths)
    outer = x.shape[:dim].numel() * nblocks
    inner = x.shape[dim + 1 :].numel()
    return x.reshape(outer, bs, inner), t.scale_exponent().reshape(outer, 1, inner)


def mx_saturated(x: torch.Tensor, t: MXTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of saturated elements, 0-d int64; block amax [outer, 1, inner], x's dtype).

    ``x``: the fp32 (or lower) high-precision tensor ``t`` was made from, in ``t``'s shape.
    Saturated: ``|x| > saturation_bound * 2^e`` (exact: a power-of-two product, inf beyond
    fp32, which is also what a NaN block's exponent 128 gives: nothing in it counts; NaN
    compares False). The block amax comes for free and is returned for callers that report
    it (NaN for a block holding a NaN). Only blocks whose amax crosses the bound are looked
    at element by element, so the usual case is one pass without an ``|x|`` copy.
    """
    xb, exps = mx_blocks(x, t)
    bound = saturation_bound(t.fmt)
    limit = torch.ldexp(torch.full_like(exps, bound, dtype=torch.float32), exps)
    lo, hi = torch.aminmax(xb, dim=1, keepdim=True)
    block_amax = torch.maximum(hi, -lo)
    clipping = (block_amax > limit).reshape(-1)  # [outer * inner] blocks
    if bool(clipping.any()):
        bs = xb.shape[1]
        blocks = xb.transpose(1, 2).reshape(-1, bs)[clipping]  # [clipping blocks, bs]
        lim = limit.transpose(1, 2).reshape(-1, 1)[clipping]
        count = (blocks.abs() > lim).sum()
    else:
        count = torch.zeros((), dtype=torch.int64, device=x.device)
    return count, block_amax


def scaled_saturated(scaled: torch.Tensor, fmt: ElemFormat | str) -> torch.Tensor:
    """Number of saturated elements (0-d int64) of already scaled values, e.g. the fp32
    ``x * scale`` a per-tensor FP8 quantizer clamps and casts (NaN compares False)."""
    return (scaled.abs() > saturation_bound(fmt)).sum()


def signal_noise(
    x: torch.Tensor, deq: torch.Tensor, *, all_finite: bool | None = None
) -> torch.Tensor:
    """float64 [2]: (sum x^2, sum (x - deq)^2) over the elements SQNR is defined on.

    Those are the finite elements of ``x`` whose dequantized value is not NaN (a NaN/Inf
    block poisons its whole block; it is reported as non-finite, not as error). A finite
    value that overflowed to inf makes the noise inf. fp32 ``x - deq`` is exact (the two are
    within a factor 2 of each other, or deq is 0), and float64 dot products sum far below
    the digits reported, in an order that does not depend on the thread count.
    ``all_finite``: the caller already knows whether ``x`` is all finite (saves a pass).
    """
    if all_finite is None:
        all_finite = bool(x.isfinite().all())
    if all_finite:  # the usual case: no masks
        xs = x.reshape(-1).double()
        err = (x - deq).reshape(-1).double()
    else:
        keep = x.isfinite() & ~deq.isnan()
        xs = torch.where(keep, x, 0).reshape(-1).double()
        err = torch.where(keep, x - deq, 0).reshape(-1).double()
    return torch.stack([torch.dot(xs, xs), torch.dot(err, err)])


def sqnr_db(signal: float, noise: float) -> float | None:
    """The SQNR convention (module docstring): dB bounded to +-SQNR_CAP_DB, None without
    signal. Never NaN or inf, so it can go to JSON as it is."""
    if not signal > 0:  # all zero, or nothing finite: nothing to compare the error with
        return None
    if noise == 0:
        return SQNR_CAP_DB
    if math.isinf(noise):
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise)))


@dataclass(frozen=True)
class QuantStats:
    """MX quantization error statistics of one tensor under one format and rule.

    Attributes (definitions in the module docstring):
        fmt, rule: what was measured.
        sqnr_db: dB, +SQNR_CAP_DB when the quantization was exact; ``None`` when the tensor
            has no signal (all zero, or no finite element).
        saturated_pct: % of finite elements the saturating clamp changed (0 under rceil).
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
    scale = eager.scale_bits_to_float(t.scale.view(torch.uint8))
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
    signal, noise = signal_noise(x32, deq, all_finite=n_finite == x32.numel()).tolist()
    saturated, _ = mx_saturated(x32, t)
    nonzero = finite & (x32 != 0)
    underflow = nonzero & (deq == 0)
    bits = t.scale.view(torch.uint8)
    finite_blocks = bits != E8M0_NAN
    exps, counts = torch.unique(bits[finite_blocks].to(torch.int32) - 127, return_counts=True)
    return QuantStats(
        fmt=fmt.name,
        rule=rule.value,
        sqnr_db=sqnr_db(signal, noise),
        saturated_pct=100.0 * int(saturated) / max(n_finite, 1),
        underflow_pct=100.0 * int(underflow.sum()) / max(int(nonzero.sum()), 1),
        nonfinite_blocks=int((~finite_blocks).sum()),
        scale_exp_hist={
            int(e): int(c) for e, c in zip(exps.tolist(), counts.tolist(), strict=True)
        },
    )
