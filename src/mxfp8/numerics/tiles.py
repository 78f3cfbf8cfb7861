"""2-D MX blocks: one E8M0 scale per ``tile x tile`` square of a matrix.

With 1x32 blocks a weight W [N, K] is quantized twice, along K for fprop and along N for
dgrad, because a block along one axis is not a block along the other. With 32x32 tiles
(TransformerEngine's and torchao's 2-D weight blocks) every element of a tile shares one
scale, chosen from the tile's amax by the usual rule, so the quantized values do not depend
on the axis: the tiles of W^T are the transposed tiles of W, and one copy serves both GEMMs.
The price: a row of small values inside a tile with a large one gets the large one's scale.

The result is an ordinary :class:`MXTensor` with 1 x ``tile`` blocks along the requested
axis whose scales repeat across the ``tile`` rows of each tile, so everything that consumes
MX operands (dequantization, the GEMM backends, telemetry) takes it unchanged.

How: each tile, flattened, is one MX block of ``tile * tile`` elements (:func:`quantize` with
that block size): the same amax, the same scale rule, the same element rounding.
"""

from __future__ import annotations

import torch

from mxfp8.numerics.formats import E4M3, ElemFormat, ScaleRule
from mxfp8.numerics.quantize import quantize
from mxfp8.numerics.tensor import MXTensor


def _tiles(x: torch.Tensor, fmt, tile: int, scale_rule) -> tuple[torch.Tensor, torch.Tensor,
                                                                   MXTensor]:  # fmt: skip
    """(codes [R, C], scales [R/tile, C/tile], the MXTensor of the flattened tiles)."""
    if x.dim() != 2:
        raise ValueError(f"2-D tiles need a matrix, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if rows % tile or cols % tile:
        raise ValueError(f"shape {tuple(x.shape)} is not a whole number of {tile}x{tile} tiles")
    tr, tc = rows // tile, cols // tile
    flat = x.reshape(tr, tile, tc, tile).transpose(1, 2).reshape(tr, tc, tile * tile)
    q = quantize(flat, fmt, block_size=tile * tile, dim=-1, scale_rule=scale_rule)
    data = q.data.reshape(tr, tc, tile, tile).transpose(1, 2).reshape(rows, cols).contiguous()
    return data, q.scale.reshape(tr, tc), q


def _blocked_along(data, scale, q: MXTensor, tile: int, dim: int) -> MXTensor:
    # 1 x tile blocks along dim: each tile's scale repeated over its rows (or columns)
    rep = scale.repeat_interleave(tile, dim=0 if dim == 1 else 1).contiguous()
    return MXTensor(data, rep, q.fmt, tile, dim, q.scale_rule)


def quantize_tiles(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    tile: int = 32,
    dim: int = -1,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
) -> MXTensor:
    """MX-quantize the 2-D ``x`` [R, C] with one scale per ``tile x tile`` square; returned
    as an MXTensor blocked along ``dim`` (blocks of ``tile``), the same data for either
    ``dim``. Both R and C must be multiples of ``tile``."""
    data, scale, q = _tiles(x, fmt, tile, scale_rule)
    return _blocked_along(data, scale, q, tile, dim % 2)


def quantize_tiles_pair(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    tile: int = 32,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
) -> tuple[MXTensor, MXTensor]:
    """(blocked along dim 1, blocked along dim 0) of one tile quantization: the two share
    their codes tensor (one copy in memory)."""
    data, scale, q = _tiles(x, fmt, tile, scale_rule)
    return _blocked_along(data, scale, q, tile, 1), _blocked_along(data, scale, q, tile, 0)
