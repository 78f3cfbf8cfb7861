"""Row- and column-wise MX fake-quantization of one 2-D tensor, from shared passes.

A linear layer needs each of x and dy quantized twice: along its last dim (fprop, dgrad) and
along its first dim (wgrad), both from the high-precision values. Viewing x [M, K] as
32x32 tiles, (M/bs, bs, K/bs, bs), both block families are reductions of the same view: a
row block is a tile row (reduce dim 3), a column block is a tile column (reduce dim 1). So
one compiled pass computes both sets of scales and a second pass writes both outputs,
reading x twice in all instead of four times (two per :func:`fake_quantize` call).

Bit-equal to two :func:`mxfp8.fake_quantize` calls (``dim=-1`` and ``dim=0``; tested on
every bf16 bit pattern and on random shapes), because each element goes through exactly
the same per-block arithmetic (:mod:`mxfp8.numerics.two_pass`).
"""

from __future__ import annotations

import torch

from mxfp8.numerics import two_pass
from mxfp8.numerics.formats import E4M3, ElemFormat, ScaleRule, as_format
from mxfp8.numerics.quantize import _check_out, _compiled, fake_quantize

__all__ = ["fake_quantize_rowcol"]


def _rowcol_scales(x4: torch.Tensor, fmt: ElemFormat, rule: ScaleRule):
    """(row inv, row scale, col inv, col scale): per-block fp32 factors of the tile view."""
    a = x4.abs()
    row = two_pass.scales_from_amax(a.amax(dim=3, keepdim=True).float(), fmt, rule)
    col = two_pass.scales_from_amax(a.amax(dim=1, keepdim=True).float(), fmt, rule)
    return (*row, *col)


def _rowcol_apply(x4, r_inv, r_scale, c_inv, c_scale, fmt, rule, out_row, out_col) -> None:
    two_pass.fake_apply(x4, r_inv, r_scale, fmt, rule, out_row)
    two_pass.fake_apply(x4, c_inv, c_scale, fmt, rule, out_col)


def fake_quantize_rowcol(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    block_size: int = 32,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
    compiled: bool = False,
    out_dtype: torch.dtype | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fake_quantize(x, dim=-1), fake_quantize(x, dim=0))`` for a 2-D ``x``.

    Both sizes of x must be multiples of ``block_size`` (no padding). ``compiled=True`` on
    CPU runs the shared two-pass kernels; otherwise (eager, GPU, or inside a caller's
    torch.compile) it simply makes the two calls. ``out_dtype`` (default x's): the results
    are cast to it, exactly as ``fake_quantize(...).to(out_dtype)`` (the layer asks for bf16
    operands from an fp32 x). ``out``: optional (row, col) contiguous buffers of x's shape
    and ``out_dtype``, written and returned.
    """
    if x.dim() != 2 or x.shape[0] % block_size or x.shape[1] % block_size:
        raise ValueError(
            f"fake_quantize_rowcol needs a 2-D tensor whose sizes are multiples of block_size "
            f"{block_size}, got shape {tuple(x.shape)}"
        )
    fmt = as_format(fmt)
    rule = ScaleRule.parse(scale_rule)
    dt = x.dtype if out_dtype is None else out_dtype
    if out is not None:
        _check_out(out[0], x.shape, dt, "out[0]")
        _check_out(out[1], x.shape, dt, "out[1]")
    fast = compiled and x.device.type == "cpu" and not torch.compiler.is_compiling()
    if not fast or x.numel() == 0 or not x.is_contiguous():
        kw = dict(block_size=block_size, scale_rule=rule, compiled=compiled)
        results = (fake_quantize(x, fmt, dim=-1, **kw), fake_quantize(x, fmt, dim=0, **kw))
        if out is None:
            return tuple(r.to(dt) for r in results)
        return tuple(o.copy_(r) for o, r in zip(out, results, strict=True))
    if out is None:
        out = (torch.empty_like(x, dtype=dt), torch.empty_like(x, dtype=dt))
    m, k = x.shape
    bs = block_size
    x4 = x.view(m // bs, bs, k // bs, bs)  # 32x32 tiles: (tile row, row, tile col, col)
    consts = (fmt, rule)
    scales = _compiled(_rowcol_scales, *consts, x.dtype)(x4, *consts)
    row, col = out[0].view(x4.shape), out[1].view(x4.shape)
    _compiled(_rowcol_apply, *consts, x.dtype)(x4, *scales, *consts, row, col)
    return out
