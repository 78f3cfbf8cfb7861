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
from mxfp8.numerics.formats import E4M3, E8M0_NAN, ElemFormat, ScaleRule, as_format
from mxfp8.numerics.kernels import e8m0_bits, inverse_scale_float
from mxfp8.numerics.quantize import _check_out, _compiled, fake_quantize, quantize
from mxfp8.numerics.tensor import MXTensor

__all__ = ["fake_quantize_rowcol", "fake_and_quantize_rowcol", "quantize_rowcol"]


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


# --- variants that keep a copy as FP8 codes + E8M0 scales ------------------------------------
#
# What a layer keeps beyond the call (the wgrad copy of x saved for backward, the cached
# weight copies) is stored as MX, 8.25 bits per element, not as its dequantized value; what it
# uses at once (the fprop copy of x) stays a dequantized operand in a scratch buffer. Same
# per-block arithmetic as above (the scale from the block amax, the codes from the same
# scaled value), hence bit-equal to ``quantize(x, dim=...)`` and ``fake_quantize``.


def _bits_and_inv(amax: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, bits_out: torch.Tensor):
    ebits, nonfinite = e8m0_bits(amax, fmt, rule)
    bits_out.copy_(torch.where(nonfinite, E8M0_NAN, ebits).to(torch.uint8))
    return inverse_scale_float(ebits)


def _mixed_scales(x4, fmt: ElemFormat, rule: ScaleRule, col_bits: torch.Tensor):
    """(row inv, row scale, col inv); writes the column blocks' E8M0 bits."""
    a = x4.abs()
    r_inv, r_scale = two_pass.scales_from_amax(a.amax(dim=3, keepdim=True).float(), fmt, rule)
    c_inv = _bits_and_inv(a.amax(dim=1, keepdim=True).float(), fmt, rule, col_bits)
    return r_inv, r_scale, c_inv


def _mixed_apply(x4, r_inv, r_scale, c_inv, c_bits, fmt, rule, out_row, col_codes) -> None:
    two_pass.fake_apply(x4, r_inv, r_scale, fmt, rule, out_row)
    two_pass.quant_apply(x4, c_inv, c_bits, fmt, rule, col_codes)


def _both_scales(x4, fmt: ElemFormat, rule: ScaleRule, row_bits, col_bits):
    a = x4.abs()
    r_inv = _bits_and_inv(a.amax(dim=3, keepdim=True).float(), fmt, rule, row_bits)
    c_inv = _bits_and_inv(a.amax(dim=1, keepdim=True).float(), fmt, rule, col_bits)
    return r_inv, c_inv


def _both_apply(x4, r_inv, r_bits, c_inv, c_bits, fmt, rule, row_codes, col_codes) -> None:
    two_pass.quant_apply(x4, r_inv, r_bits, fmt, rule, row_codes)
    two_pass.quant_apply(x4, c_inv, c_bits, fmt, rule, col_codes)


def _check_2d(x: torch.Tensor, block_size: int, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what} needs a 2-D tensor, got shape {tuple(x.shape)}")


def _fast(x: torch.Tensor, block_size: int, compiled: bool) -> bool:
    """Whether the shared two-pass CPU kernels apply (else: separate calls)."""
    return (
        compiled
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and x.is_contiguous()
        and x.numel() > 0
        and x.shape[0] % block_size == 0
        and x.shape[1] % block_size == 0
    )


def _mx(codes: torch.Tensor, bits: torch.Tensor, shape, scale_shape, fmt, bs, dim, rule):
    data = codes.view(shape).view(fmt.torch_dtype)
    scale = bits.reshape(scale_shape).view(torch.float8_e8m0fnu)
    return MXTensor(data, scale, fmt, bs, dim, rule)


def fake_and_quantize_rowcol(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    block_size: int = 32,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
    compiled: bool = False,
    out_dtype: torch.dtype | None = None,
    out_row: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MXTensor]:
    """``(fake_quantize(x, dim=-1).to(out_dtype), quantize(x, dim=0, pad=True))`` of a 2-D x.

    The row copy is an operand used at once (``out_row``: an optional contiguous buffer of
    x's shape and ``out_dtype``); the column copy is kept, as FP8 codes and scales. A first
    size that is not a multiple of ``block_size`` zero-pads the last column block (tokens:
    the wgrad reduction); the second size must be a multiple.
    """
    _check_2d(x, block_size, "fake_and_quantize_rowcol")
    fmt, rule = as_format(fmt), ScaleRule.parse(scale_rule)
    dt = x.dtype if out_dtype is None else out_dtype
    if out_row is not None:
        _check_out(out_row, x.shape, dt, "out_row")
    kw = dict(block_size=block_size, scale_rule=rule, compiled=compiled)
    if not _fast(x, block_size, compiled):
        row = fake_quantize(x, fmt, dim=-1, **kw)
        row = row.to(dt) if out_row is None else out_row.copy_(row)
        return row, quantize(x, fmt, dim=0, pad=True, **kw)
    m, k = x.shape
    bs = block_size
    x4 = x.view(m // bs, bs, k // bs, bs)
    row = out_row if out_row is not None else torch.empty_like(x, dtype=dt)
    codes = torch.empty(x4.shape, dtype=torch.uint8, device=x.device)
    bits = torch.empty((m // bs, 1, k // bs, bs), dtype=torch.uint8, device=x.device)
    consts = (fmt, rule)
    r_inv, r_scale, c_inv = _compiled(_mixed_scales, *consts, x.dtype)(x4, *consts, bits)
    _compiled(_mixed_apply, *consts, x.dtype)(
        x4, r_inv, r_scale, c_inv, bits, *consts, row.view(x4.shape), codes
    )
    return row, _mx(codes, bits, x.shape, (m // bs, k), fmt, bs, 0, rule)


def quantize_rowcol(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    block_size: int = 32,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
    compiled: bool = False,
) -> tuple[MXTensor, MXTensor]:
    """``(quantize(x, dim=-1), quantize(x, dim=0))`` of a 2-D x from shared passes (both
    sizes multiples of ``block_size`` for the shared kernels; otherwise separate calls,
    zero-padding partial blocks)."""
    _check_2d(x, block_size, "quantize_rowcol")
    fmt, rule = as_format(fmt), ScaleRule.parse(scale_rule)
    kw = dict(block_size=block_size, scale_rule=rule, compiled=compiled, pad=True)
    if not _fast(x, block_size, compiled):
        return quantize(x, fmt, dim=-1, **kw), quantize(x, fmt, dim=0, **kw)
    m, k = x.shape
    bs = block_size
    x4 = x.view(m // bs, bs, k // bs, bs)
    dev = x.device
    row_codes = torch.empty(x4.shape, dtype=torch.uint8, device=dev)
    col_codes = torch.empty(x4.shape, dtype=torch.uint8, device=dev)
    row_bits = torch.empty((m // bs, bs, k // bs, 1), dtype=torch.uint8, device=dev)
    col_bits = torch.empty((m // bs, 1, k // bs, bs), dtype=torch.uint8, device=dev)
    consts = (fmt, rule)
    r_inv, c_inv = _compiled(_both_scales, *consts, x.dtype)(x4, *consts, row_bits, col_bits)
    _compiled(_both_apply, *consts, x.dtype)(
        x4, r_inv, row_bits, c_inv, col_bits, *consts, row_codes, col_codes
    )
    row = _mx(row_codes, row_bits, x.shape, (m, k // bs), fmt, bs, 1, rule)
    col = _mx(col_codes, col_bits, x.shape, (m // bs, k), fmt, bs, 0, rule)
    return row, col
