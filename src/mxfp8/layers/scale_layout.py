"""The cuBLAS layout of MX block scales (what ``torch._scaled_mm`` reads on Blackwell).

The ``scaled_mm`` backend hands cuBLAS its E8M0 scales in a swizzled tile layout; these
functions build it and undo it. They run on any device, so the layout is unit-tested on CPU.
"""

from __future__ import annotations

import torch

# cuBLAS block-scale tiles: 128 rows x 4 scale columns, stored as 512 contiguous bytes
_TILE_ROWS, _TILE_COLS = 128, 4


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def blocked_scale_offset(row: int, col: int, n_cols: int) -> int:
    """Byte offset of scale (row, col) in the cuBLAS blocked layout of a [rows, n_cols] scale.

    The matrix is cut into 128x4 tiles, tiles stored row-major (n_col_tiles per tile row), and
    inside a tile, row r and column c go to (r % 32) * 16 + (r // 32) * 4 + c: the four
    32-row groups are interleaved so that one 16-byte load holds 4 rows x 4 scales.
    Scalar and simple on purpose: it is the oracle of :func:`to_blocked_scales`.
    """
    n_col_tiles = _ceil_to(n_cols, _TILE_COLS) // _TILE_COLS
    tile = (row // _TILE_ROWS) * n_col_tiles + col // _TILE_COLS
    r, c = row % _TILE_ROWS, col % _TILE_COLS
    return tile * _TILE_ROWS * _TILE_COLS + (r % 32) * 16 + (r // 32) * 4 + c


def to_blocked_scales(scale: torch.Tensor) -> torch.Tensor:
    """[rows, cols] scales (one per 32-element block along K) -> flat cuBLAS blocked layout.

    Rows are padded to a multiple of 128 and columns to a multiple of 4 (padding bytes are
    zero; the hardware never reads them for in-range data). Works on any device and dtype
    (e8m0 scales are moved as uint8 bytes).
    """
    if scale.dim() != 2:
        raise ValueError(f"expected a 2-D scale matrix, got shape {tuple(scale.shape)}")
    dtype = scale.dtype
    s = scale.view(torch.uint8) if dtype == torch.float8_e8m0fnu else scale
    rows, cols = s.shape
    pr, pc = _ceil_to(rows, _TILE_ROWS), _ceil_to(cols, _TILE_COLS)
    padded = s.new_zeros((pr, pc))
    padded[:rows, :cols] = s
    # (row_tiles, 4 groups of 32 rows, 32, col_tiles, 4): row = t*128 + g*32 + i
    t = padded.view(pr // _TILE_ROWS, 4, 32, pc // _TILE_COLS, _TILE_COLS)
    # tile-major, then i (row within group), then g, then c: offset i*16 + g*4 + c
    out = t.permute(0, 3, 2, 1, 4).reshape(-1)
    return out.view(dtype) if dtype == torch.float8_e8m0fnu else out


def from_blocked_scales(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_blocked_scales` (drops the padding)."""
    dtype = flat.dtype
    f = flat.view(torch.uint8) if dtype == torch.float8_e8m0fnu else flat
    pr, pc = _ceil_to(rows, _TILE_ROWS), _ceil_to(cols, _TILE_COLS)
    t = f.view(pr // _TILE_ROWS, pc // _TILE_COLS, 32, 4, _TILE_COLS)
    out = t.permute(0, 3, 2, 1, 4).reshape(pr, pc)[:rows, :cols].contiguous()
    return out.view(dtype) if dtype == torch.float8_e8m0fnu else out
