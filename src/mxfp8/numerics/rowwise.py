"""Per-row (per-channel) FP8 with current scaling: one fp32 scale per row along ``dim``.

The per-tensor rule of :mod:`mxfp8.numerics.tensorwise`, applied to each 1-D slice along
``dim`` on its own: ``scale = dest_max / amax(slice)`` (1 when that amax is 0 or not finite,
capped at the largest fp32), ``data = saturate(RNE(x * scale))`` computed in fp32, and
``x ~= data / scale``. A GEMM quantizes each operand along its reduction dim, so each scale
belongs to one row (or column) of the output and factors out of the sum: for y = x W^T, x
[M, K] gets one scale per row (``dim=1``) and W [N, K] one per row (``dim=1``); for
dx = dy W, W gets one scale per column (``dim=0``). This is torchao's ``rowwise`` recipe and
what ``torch._scaled_mm`` takes as row-wise scales.

A slice holding NaN or Inf has a non-finite amax, scale 1, and those elements become FP8 NaN
(never a finite number); its finite elements still saturate. Other slices are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mxfp8.numerics.formats import E4M3, ElemFormat, as_format, check_float_input
from mxfp8.numerics.tensorwise import current_scale

__all__ = ["RowwiseFP8", "quantize_rowwise", "row_amax"]


@dataclass(frozen=True)
class RowwiseFP8:
    """An FP8 tensor with one fp32 scale per slice along ``dim``.

    Attributes:
        data: FP8 elements, the source shape; NaN codes where the source was NaN or Inf.
        scale: fp32, the source shape with ``dim`` of size 1: the factor applied before the
            cast (broadcasts against ``data``).
        amax: fp32, the shape of ``scale``: max |x| of each slice (NaN/Inf if it held one).
        dim: the reduced axis (non-negative), along which each scale is shared.
        fmt: the element format.
    """

    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    dim: int
    fmt: ElemFormat

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def scale_inv(self) -> torch.Tensor:
        """1 / scale: the dequantization factors (``_scaled_mm``'s row-wise scales)."""
        return self.scale.reciprocal()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data / scale`` in fp32 (one correctly rounded division), then cast to ``dtype``."""
        return (self.data.float() / self.scale).to(dtype)


def row_amax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max |x| along ``dim`` (kept as size 1), fp32; NaN for a slice holding a NaN, 0 for an
    empty slice."""
    if x.numel() == 0:
        shape = list(x.shape)
        shape[dim] = 1
        return torch.zeros(shape, dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x, dim=dim, keepdim=True)
    return torch.maximum(hi, -lo).float()


def quantize_rowwise(x: torch.Tensor, fmt: ElemFormat | str = E4M3, dim: int = -1) -> RowwiseFP8:
    """Per-row FP8 along ``dim``: ``data = saturate(RNE(x * scale))``, one current scale
    ``dest_max / amax`` per slice along ``dim`` (see the module docstring)."""
    check_float_input(x)
    fmt = as_format(fmt)
    if x.dim() == 0:
        raise ValueError("row-wise quantization needs a tensor of at least one dimension")
    dim = dim % x.dim()
    amax = row_amax(x, dim)
    scale = current_scale(amax, fmt)
    y = x.float() * scale  # in fp32, whatever x's dtype
    y = y.clamp_(-fmt.max_finite, fmt.max_finite)  # saturate: E5M2 casts do not
    if x.numel() and not bool(torch.isfinite(amax).all()):
        y.masked_fill_(~torch.isfinite(x), float("nan"))  # clamp turned Inf into max_finite
    return RowwiseFP8(y.to(fmt.torch_dtype), scale, amax, dim, fmt)
