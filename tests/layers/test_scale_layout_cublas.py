"""The swizzled E8M0 scale layout of ``layers/scale_layout.py`` against the cuBLAS
documentation's own statement of it, written out here independently of the module (which
carries its own oracle, ``blocked_scale_offset``, and is otherwise tested through its
inverse: a wrong swizzle with a matching inverse passes those tests).

cuBLAS, "1D Block Scaling Factors Layout" (also torchao's ``to_blocked`` and nvmath's
``get_block_scale_offset``): the [rows, cols] scale matrix is padded to a multiple of 128
rows and 4 columns and cut into tiles of 128 rows x 4 scale columns; the tiles are stored one
after another, 512 bytes each, row-major over (row tile, column tile); inside a tile the scale
of (row r, column c) lives at byte (r % 32) * 16 + (r // 32) * 4 + c.

Every scale here encodes its own coordinates, so a byte in the wrong place names where it
came from, and padding (zero) cannot pass for a scale.
"""

from __future__ import annotations

import pytest
import torch

from mxfp8.layers.gemm import MXSpec, ScaledMMBackend
from mxfp8.layers.scale_layout import from_blocked_scales, to_blocked_scales
from mxfp8.numerics.quantize import quantize

# (rows, cols): exact tiles, several tiles each way, and padding in rows, columns or both
SHAPES = [(128, 4), (256, 8), (130, 5), (1, 1), (200, 6), (300, 9), (64, 12)]


def cublas_layout(rows: int, cols: int) -> list[tuple[int, int] | None]:
    """byte offset -> (row, col) of the scale stored there, or None for a padding byte: the
    documented layout, one tile and one byte at a time."""
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    where: list[tuple[int, int] | None] = [None] * (row_tiles * col_tiles * 512)
    for rt in range(row_tiles):
        for ct in range(col_tiles):
            base = (rt * col_tiles + ct) * 512
            for r in range(128):
                for c in range(4):
                    row, col = rt * 128 + r, ct * 4 + c
                    offset = base + (r % 32) * 16 + (r // 32) * 4 + c
                    assert where[offset] is None  # each byte holds one scale
                    where[offset] = (row, col) if row < rows and col < cols else None
    return where


def coordinates(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two int32 matrices holding 1 + each element's row, and 1 + its column (0 = padding)."""
    r = torch.arange(1, rows + 1, dtype=torch.int32)[:, None].expand(rows, cols).contiguous()
    c = torch.arange(1, cols + 1, dtype=torch.int32)[None, :].expand(rows, cols).contiguous()
    return r, c


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_every_scale_lands_where_cublas_reads_it(rows, cols):
    where = cublas_layout(rows, cols)
    r, c = coordinates(rows, cols)
    got_r, got_c = to_blocked_scales(r), to_blocked_scales(c)
    assert got_r.shape == got_c.shape == (len(where),)
    want_r = torch.tensor([0 if w is None else w[0] + 1 for w in where], dtype=torch.int32)
    want_c = torch.tensor([0 if w is None else w[1] + 1 for w in where], dtype=torch.int32)
    bad = (got_r != want_r) | (got_c != want_c)
    first = int(bad.nonzero()[0]) if bad.any() else None
    assert first is None, (
        f"byte {first}: holds scale ({int(got_r[first]) - 1}, {int(got_c[first]) - 1}), "
        f"cuBLAS reads {where[first]} there"
    )


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_e8m0_bytes_and_the_inverse_against_the_documented_layout(rows, cols):
    """The dtype the backend really hands over (E8M0), one byte per scale encoding its
    coordinates as (row * cols + col) mod 256; and from_blocked_scales reading a buffer built
    by the documented formula, not by to_blocked_scales."""
    where = cublas_layout(rows, cols)
    code = [[(row * cols + col) % 256 for col in range(cols)] for row in range(rows)]
    s = torch.tensor(code, dtype=torch.uint8)
    flat = torch.tensor([0 if w is None else code[w[0]][w[1]] for w in where], dtype=torch.uint8)
    got = to_blocked_scales(s.view(torch.float8_e8m0fnu))
    assert got.dtype == torch.float8_e8m0fnu
    assert torch.equal(got.view(torch.uint8), flat)
    back = from_blocked_scales(flat.view(torch.float8_e8m0fnu), rows, cols)
    assert back.dtype == torch.float8_e8m0fnu
    assert torch.equal(back.view(torch.uint8), s)


def test_the_backend_hands_scaled_mm_the_documented_layout():
    """What ScaledMMBackend.mm_nt passes as scale_a / scale_b: each operand's E8M0 scales
    (row-wise, blocks of 32 along K) placed by the documented formula. M = 130 and N = 70
    rows pad to one more row tile; K = 160 is 5 blocks, padded to 8 scale columns."""
    m, k, n = 130, 160, 70
    g = torch.Generator().manual_seed(0)

    def operand(rows):  # a random power of two per block: neighbouring scales differ
        exps = torch.randint(-30, 30, (rows, k // 32), generator=g).float()
        return torch.randn(rows, k, generator=g) * (2**exps).repeat_interleave(32, dim=1)

    a_hp, b_hp = operand(m), operand(n)
    backend = ScaledMMBackend(require_sm100=False)
    spec = MXSpec("e4m3", 32, "rceil")
    a, _ = backend.quantize_mx(a_hp.bfloat16(), spec, torch.bfloat16)
    b, _ = backend.quantize_mx(b_hp.bfloat16(), spec, torch.bfloat16)
    seen = {}

    def mm(a_data, b_data, scale_a, scale_b, out_dtype):
        seen.update(a=scale_a, b=scale_b)
        return torch.zeros(a_data.shape[0], b_data.shape[1], dtype=out_dtype)

    backend.mm = mm
    backend.mm_nt(a, b, torch.float32)
    for name, hp, rows in (("a", a_hp, m), ("b", b_hp, n)):
        scale = quantize(hp.bfloat16(), "e4m3", dim=1).scale.view(torch.uint8)
        assert scale.shape == (rows, k // 32)
        want = torch.tensor(
            [0 if w is None else int(scale[w]) for w in cublas_layout(rows, k // 32)],
            dtype=torch.uint8,
        )
        assert len(set(scale.flatten().tolist())) > 40  # scales tell their places apart
        assert torch.equal(seen[name].view(torch.uint8), want), name
