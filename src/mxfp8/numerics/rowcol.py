"""Both MX copies of one 2-D tensor at once: along its last dim and along its first dim.

A linear layer needs each of x and dy quantized twice: along its last dim (fprop, dgrad) and
along its first dim (wgrad), both from the high-precision values. These entries give the two
copies from shared passes where a kernel that makes them together applies: the two-pass CPU
kernel (:mod:`mxfp8.numerics.backends.cpu`, ``compiled=True`` on CPU) or the one-read Triton
kernel (``kernel="triton"``). Elsewhere (eager, ``inductor`` off CPU, inside a caller's
torch.compile, a non-contiguous or unaligned tensor) they simply make two calls of
:mod:`mxfp8.numerics.quantize`.

Bit-equal to those two calls (``dim=-1`` and ``dim=0``; tested on every bf16 bit pattern and on
random shapes), because each element goes through exactly the same per-block arithmetic.

What a layer keeps beyond the call (the wgrad copy of x saved for backward, the cached weight
copies) is stored as MX, 8.25 bits per element (:func:`fake_and_quantize_rowcol`,
:func:`quantize_rowcol`); what it uses at once stays a dequantized operand.
"""

from __future__ import annotations

import torch

from mxfp8.numerics import backends
from mxfp8.numerics.backends import Kernel, cpu
from mxfp8.numerics.formats import E4M3, ElemFormat, ScaleRule, as_format
from mxfp8.numerics.quantize import _check_out, dequantize, fake_quantize, quantize
from mxfp8.numerics.tensor import MXTensor

__all__ = ["fake_quantize_rowcol", "fake_and_quantize_rowcol", "quantize_rowcol"]


def _shared(x: torch.Tensor, block_size: int, compiled: bool, kernel: str | None) -> Kernel | None:
    """The kernel that makes both copies together here (CPU or TRITON), or None: two calls."""
    which = backends.resolve(kernel, compiled, x.device)
    if x.numel() == 0 or torch.compiler.is_compiling():
        return None
    if which is Kernel.TRITON:
        return which
    whole = x.shape[0] % block_size == 0 and x.shape[1] % block_size == 0
    return which if which is Kernel.CPU and whole and x.is_contiguous() else None


def _triton(x: torch.Tensor, fmt: ElemFormat, rule: ScaleRule, block_size: int):
    """(row MXTensor, column MXTensor) from the one-read Triton kernel."""
    from mxfp8.numerics.backends import triton_mx

    (rq, rs), (cq, cs) = triton_mx.quantize_rowcol(x, fmt, rule, block_size=block_size)
    e8m0, q8 = torch.float8_e8m0fnu, fmt.torch_dtype
    row = MXTensor(rq.view(q8), rs.view(e8m0), fmt, block_size, 1, rule)
    return row, MXTensor(cq.view(q8), cs.view(e8m0), fmt, block_size, 0, rule)


def _tiles(x: torch.Tensor, block_size: int) -> torch.Tensor:
    m, k = x.shape
    return x.view(m // block_size, block_size, k // block_size, block_size)


def _mx(codes: torch.Tensor, bits: torch.Tensor, shape, scale_shape, fmt, bs, dim, rule):
    data = codes.view(shape).view(fmt.torch_dtype)
    scale = bits.reshape(scale_shape).view(torch.float8_e8m0fnu)
    return MXTensor(data, scale, fmt, bs, dim, rule)


def fake_quantize_rowcol(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    block_size: int = 32,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
    compiled: bool = False,
    out_dtype: torch.dtype | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fake_quantize(x, dim=-1), fake_quantize(x, dim=0))`` for a 2-D ``x``.

    Both sizes of x must be multiples of ``block_size`` (no padding). ``out_dtype`` (default
    x's): the results are cast to it, exactly as ``fake_quantize(...).to(out_dtype)`` (the
    layer asks for bf16 operands from an fp32 x). ``out``: optional (row, col) contiguous
    buffers of x's shape and ``out_dtype``, written and returned. ``kernel``: as for
    :func:`mxfp8.quantize` (``triton``: one read for both copies, then its dequantize).
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
    which = _shared(x, block_size, compiled, kernel)
    if which is None:
        kw = dict(block_size=block_size, scale_rule=rule, compiled=compiled)
        results = (fake_quantize(x, fmt, dim=-1, **kw), fake_quantize(x, fmt, dim=0, **kw))
    elif which is Kernel.TRITON:
        results = tuple(
            dequantize(t, x.dtype, kernel=which) for t in _triton(x, fmt, rule, block_size)
        )
    else:
        if out is None:
            out = (torch.empty_like(x, dtype=dt), torch.empty_like(x, dtype=dt))
        x4 = _tiles(x, block_size)
        cpu.fake_rowcol(x4, fmt, rule, out[0].view(x4.shape), out[1].view(x4.shape))
        return out
    if out is None:
        return tuple(r.to(dt) for r in results)
    return tuple(o.copy_(r) for o, r in zip(out, results, strict=True))


def fake_and_quantize_rowcol(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    block_size: int = 32,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
    compiled: bool = False,
    out_dtype: torch.dtype | None = None,
    out_row: torch.Tensor | None = None,
    kernel: str | None = None,
) -> tuple[torch.Tensor, MXTensor]:
    """``(fake_quantize(x, dim=-1).to(out_dtype), quantize(x, dim=0, pad=True))`` of a 2-D x.

    The row copy is an operand used at once (``out_row``: an optional contiguous buffer of
    x's shape and ``out_dtype``); the column copy is kept, as FP8 codes and scales. A first
    size that is not a multiple of ``block_size`` zero-pads the last column block (tokens:
    the wgrad reduction); the second size must be a multiple.
    """
    _check_2d(x, "fake_and_quantize_rowcol")
    fmt, rule = as_format(fmt), ScaleRule.parse(scale_rule)
    dt = x.dtype if out_dtype is None else out_dtype
    if out_row is not None:
        _check_out(out_row, x.shape, dt, "out_row")
    which = _shared(x, block_size, compiled, kernel)
    if which is Kernel.TRITON:
        row_q, col = _triton(x, fmt, rule, block_size)
        row = dequantize(row_q, x.dtype, kernel=which)
        return (row.to(dt) if out_row is None else out_row.copy_(row)), col
    if which is None:
        kw = dict(block_size=block_size, scale_rule=rule, compiled=compiled)
        row = fake_quantize(x, fmt, dim=-1, **kw)
        row = row.to(dt) if out_row is None else out_row.copy_(row)
        return row, quantize(x, fmt, dim=0, pad=True, **kw)
    m, k = x.shape
    bs = block_size
    x4 = _tiles(x, bs)
    row = out_row if out_row is not None else torch.empty_like(x, dtype=dt)
    codes = torch.empty(x4.shape, dtype=torch.uint8, device=x.device)
    bits = torch.empty((m // bs, 1, k // bs, bs), dtype=torch.uint8, device=x.device)
    cpu.fake_and_quantize_rowcol(x4, fmt, rule, row.view(x4.shape), codes, bits)
    return row, _mx(codes, bits, x.shape, (m // bs, k), fmt, bs, 0, rule)


def quantize_rowcol(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    block_size: int = 32,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
    compiled: bool = False,
    kernel: str | None = None,
) -> tuple[MXTensor, MXTensor]:
    """``(quantize(x, dim=-1), quantize(x, dim=0))`` of a 2-D x, zero-padding partial blocks
    (the shared CPU passes need both sizes to be multiples of ``block_size``; otherwise two
    calls)."""
    _check_2d(x, "quantize_rowcol")
    fmt, rule = as_format(fmt), ScaleRule.parse(scale_rule)
    which = _shared(x, block_size, compiled, kernel)
    if which is Kernel.TRITON:
        return _triton(x, fmt, rule, block_size)
    if which is None:
        kw = dict(block_size=block_size, scale_rule=rule, compiled=compiled, pad=True)
        return quantize(x, fmt, dim=-1, **kw), quantize(x, fmt, dim=0, **kw)
    m, k = x.shape
    bs = block_size
    x4 = _tiles(x, bs)
    dev = x.device
    row_codes = torch.empty(x4.shape, dtype=torch.uint8, device=dev)
    col_codes = torch.empty(x4.shape, dtype=torch.uint8, device=dev)
    row_bits = torch.empty((m // bs, bs, k // bs, 1), dtype=torch.uint8, device=dev)
    col_bits = torch.empty((m // bs, 1, k // bs, bs), dtype=torch.uint8, device=dev)
    cpu.quantize_rowcol(x4, fmt, rule, row_codes, row_bits, col_codes, col_bits)
    row = _mx(row_codes, row_bits, x.shape, (m, k // bs), fmt, bs, 1, rule)
    col = _mx(col_codes, col_bits, x.shape, (m // bs, k), fmt, bs, 0, rule)
    return row, col


def _check_2d(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what} needs a 2-D tensor, got shape {tuple(x.shape)}")
