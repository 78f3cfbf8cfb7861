"""The MX quantization entry: ``quantize``, ``dequantize`` and ``fake_quantize``.

Each call validates its arguments, lays ``x`` out as blocks and hands them to one kernel of
:mod:`mxfp8.numerics.backends` (the table of which kernel runs where is there):
``reference`` (the oracle), ``eager``, ``inductor``, ``cpu`` or ``triton``. Two copies of one
2-D tensor at once (what the linear layers need) go through :mod:`mxfp8.numerics.rowcol`.

Semantics (identical, bit for bit, to the spec-simple oracle in ``reference.py``):

- blocks of ``block_size`` consecutive elements along ``dim``, one E8M0 scale per block,
  chosen by the :class:`ScaleRule` (exact, from the fp32 bits of the block amax) and
  clamped to [-127, 127];
- elements are ``x / 2^e`` rounded to nearest-even in the element format, saturating to
  +-max_finite;
- an all-zero block has scale bits 0 and zero elements; a block holding any NaN or Inf has
  scale bits 255 and NaN elements (code 0x7F), so it dequantizes to NaN;
- fp32 subnormal inputs are not flushed.

``compiled=True`` runs the same math through ``torch.compile`` (fused loops instead of
several eager passes; the first call per format, rule and dtype compiles, which takes
seconds). Both paths are tested to be bit-identical. ``out=`` reuses output buffers: fresh
large allocations are page-fault bound on CPU (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mxfp8.numerics import backends
from mxfp8.numerics.backends import Kernel, cpu, eager, inductor
from mxfp8.numerics.formats import E4M3, ElemFormat, ScaleRule, as_format, check_float_input
from mxfp8.numerics.tensor import MXTensor

__all__ = ["quantize", "dequantize", "fake_quantize"]


def _check_args(x: torch.Tensor, block_size: int, dim: int) -> int:
    """Validate the common arguments; return ``dim`` made non-negative."""
    check_float_input(x)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if x.dim() == 0:
        raise ValueError("MX quantization needs a tensor with at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"dim {dim} out of range for a {x.dim()}-d tensor")
    return dim % x.dim()


def _blocked(x: torch.Tensor, block_size: int, dim: int, pad: bool):
    """Reshape x to (outer, block_size, inner) blocks along ``dim``, zero-padding if asked.

    Returns the block view, the scale shape and the (padded) shape of x.
    """
    size = x.shape[dim]
    if size % block_size:
        if not pad:
            raise ValueError(
                f"size {size} along dim {dim} is not a multiple of block_size {block_size} "
                "(pass pad=True to zero-pad the last block)"
            )
        # F.pad counts from the last dimension: (left, right) pairs, last dim first
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, block_size - size % block_size]
        x = F.pad(x, widths)
    nblocks = x.shape[dim] // block_size
    outer = x.shape[:dim].numel() * nblocks
    inner = x.shape[dim + 1 :].numel()
    xb = x.reshape(outer, block_size, inner)  # one E8M0 scale per block_size values along dim
    scale_shape = list(x.shape)
    scale_shape[dim] = nblocks
    return xb, scale_shape, x.shape


def _unpad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    return t if t.shape[dim] == size else t.narrow(dim, 0, size).contiguous()


def _reference(x: torch.Tensor, fmt: ElemFormat, block_size: int, dim: int,
               rule: ScaleRule) -> MXTensor:  # fmt: skip
    """The oracle (:mod:`mxfp8.numerics.reference`) as an MXTensor, partial blocks padded."""
    from mxfp8.numerics.reference import ref_quantize

    size = x.shape[dim]
    padded = F.pad(x.float(), [0, 0] * (x.dim() - 1 - dim) + [0, (-size) % block_size])
    codes, bits = ref_quantize(padded.cpu().numpy(), fmt, block_size=block_size, dim=dim,
                               scale_rule=rule)  # fmt: skip
    data = torch.from_numpy(codes).narrow(dim, 0, size).contiguous().view(fmt.torch_dtype)
    scale = torch.from_numpy(bits).view(torch.float8_e8m0fnu)
    return MXTensor(data.to(x.device), scale.to(x.device), fmt, block_size, dim, rule)


def _triton(x: torch.Tensor, fmt: ElemFormat, block_size: int, dim: int,
            rule: ScaleRule) -> MXTensor:  # fmt: skip
    from mxfp8.numerics.backends import triton_mx

    if x.dim() != 2:
        raise ValueError(f"kernel 'triton' quantizes 2-D tensors, got shape {tuple(x.shape)}")
    return triton_mx.quantize(x, fmt, rule, block_size=block_size, dim=dim)


def _cpu_kernel(which: Kernel) -> bool:
    """Whether the two-pass CPU kernel runs; inside a caller's torch.compile the branch-free
    eager math is traced instead (the caller's compiler fuses it)."""
    return which is Kernel.CPU and not torch.compiler.is_compiling()


def _check_out(out: torch.Tensor, shape, dtype: torch.dtype, what: str) -> None:
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"{what} must be a contiguous {dtype} tensor of shape {tuple(shape)}, "
            f"got {out.dtype} {tuple(out.shape)} (contiguous={out.is_contiguous()})"
        )


def quantize(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    block_size: int = 32,
    dim: int = -1,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
    pad: bool = False,
    compiled: bool = False,
    out: MXTensor | None = None,
    kernel: str | None = None,
) -> MXTensor:
    """MX-quantize ``x`` (fp32, bf16 or fp16, any rank) along ``dim``.

    Raises ValueError when ``x.shape[dim]`` is not a multiple of ``block_size`` unless
    ``pad=True``, which zero-pads the last block of each row before choosing its scale
    (the zeros never change a block's amax); ``data`` keeps x's shape and ``scale`` has
    ``ceil(size / block_size)`` entries along ``dim``.

    ``compiled=True`` uses the torch.compile'd kernel (bit-identical, several times faster
    after a first call that compiles). ``out``: an MXTensor of the same shape, format and
    layout whose ``data`` and ``scale`` buffers are overwritten and returned in a new
    MXTensor; fresh large allocations are slow on CPU, so hot loops should reuse buffers.
    ``kernel`` names the implementation (:mod:`mxfp8.numerics.backends`: ``reference``,
    ``eager``, ``inductor``, ``cpu``, ``triton``); all give the same result.
    """
    dim = _check_args(x, block_size, dim)
    fmt = as_format(fmt)
    rule = ScaleRule.parse(scale_rule)
    size = x.shape[dim]
    which = backends.resolve(kernel, compiled, x.device)
    if which in (Kernel.TRITON, Kernel.REFERENCE) and x.numel():
        if size % block_size and not pad:
            raise ValueError(
                f"size {size} along dim {dim} is not a multiple of block_size {block_size} "
                "(pass pad=True to zero-pad the last block)"
            )
        run = _triton if which is Kernel.TRITON else _reference
        t = run(x, fmt, block_size, dim, rule)
        if out is not None:
            _check_out(out.data, x.shape, fmt.torch_dtype, "out.data")
            _check_out(out.scale, t.scale.shape, torch.float8_e8m0fnu, "out.scale")
            t = MXTensor(out.data.copy_(t.data), out.scale.copy_(t.scale), fmt, block_size,
                         dim, rule)  # fmt: skip
        return t
    if x.numel() == 0:
        scale_shape = list(x.shape)
        scale_shape[dim] = -(-size // block_size)
        data = torch.empty(x.shape, dtype=fmt.torch_dtype, device=x.device)
        scale = torch.empty(scale_shape, dtype=torch.float8_e8m0fnu, device=x.device)
        return MXTensor(data, scale, fmt, block_size, dim, rule)
    xb, scale_shape, padded_shape = _blocked(x, block_size, dim, pad)
    direct = out is not None and padded_shape == x.shape  # write straight into out
    if out is not None:
        _check_out(out.data, x.shape, fmt.torch_dtype, "out.data")
        _check_out(out.scale, torch.Size(scale_shape), torch.float8_e8m0fnu, "out.scale")
    if _cpu_kernel(which):
        scale_view = (xb.shape[0], 1, xb.shape[2])  # one scale per (outer, inner) block
        if direct:
            codes = out.data.view(torch.uint8).view(xb.shape)
            bits = out.scale.view(torch.uint8).view(scale_view)
        else:
            codes = torch.empty(xb.shape, dtype=torch.uint8, device=x.device)
            bits = torch.empty(scale_view, dtype=torch.uint8, device=x.device)
        cpu.quantize(xb, fmt, rule, codes, bits)
        q = codes.view(fmt.torch_dtype)
    else:
        fn = inductor.block_kernel(eager.quantize_blocks, which is not Kernel.EAGER, fmt, rule,
                                   x.dtype)  # fmt: skip
        if direct:
            bufs = (out.data.view(xb.shape), out.scale.view(torch.uint8).view(xb.shape[0], 1, -1))
            q, bits = fn(xb, fmt, rule, out=bufs)
        else:
            q, bits = fn(xb, fmt, rule)
    data = _unpad(q.reshape(padded_shape), dim, size)
    scale = bits.reshape(scale_shape).view(torch.float8_e8m0fnu)
    if out is not None and not direct:
        data, scale = out.data.copy_(data), out.scale.copy_(scale)
    return MXTensor(data, scale, fmt, block_size, dim, rule)


def dequantize(
    t: MXTensor,
    dtype: torch.dtype = torch.float32,
    *,
    compiled: bool = False,
    kernel: str | None = None,
) -> torch.Tensor:
    """``t.dequantize(dtype)``: data times 2^scale, NaN for blocks with a NaN scale.

    ``compiled=True`` runs it as one fused torch.compile'd pass (bit-identical: the product
    of an FP8 value and a power of two is exact in fp32, then cast once), for tensors whose
    blocked size is a multiple of the block size; others take the eager path.
    """
    which = backends.resolve(kernel, compiled, t.data.device)
    if which is Kernel.TRITON and t.data.dim() == 2 and t.data.numel():
        from mxfp8.numerics.backends import triton_mx

        codes, bits = t.data.view(torch.uint8), t.scale.view(torch.uint8)
        return triton_mx.dequantize(codes, bits, t.fmt, t.dim, dtype)
    compiled = which in (Kernel.INDUCTOR, Kernel.CPU)
    size = t.data.shape[t.dim] if t.data.dim() else 0
    if not compiled or t.data.numel() == 0 or size % t.block_size:
        return t.dequantize(dtype)
    shape = t.data.shape
    outer = shape[: t.dim].numel() * (size // t.block_size)
    inner = shape[t.dim + 1 :].numel()
    # contiguous (cheap: FP8 codes and scale bytes): one graph per size pattern, not one
    # per stride pattern of the views the layers hand over
    qb = t.data.reshape(outer, t.block_size, inner).contiguous()
    bits = t.scale.view(torch.uint8).reshape(outer, 1, inner).contiguous()
    fn = inductor.compiled(eager.dequantize_blocks, t.fmt, t.scale_rule, dtype)
    return fn(qb, bits, dtype).reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    fmt: ElemFormat | str = E4M3,
    *,
    block_size: int = 32,
    dim: int = -1,
    scale_rule: ScaleRule | str = ScaleRule.RCEIL,
    pad: bool = False,
    compiled: bool = False,
    out: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """x rounded onto the MX grid, in x's dtype and shape.

    Bit-equal to ``quantize(x, ...).dequantize(x.dtype)`` without materializing the
    MXTensor: the hot path of the emulated GEMMs. The dequantized values are computed in
    fp32 and then cast, so for fp16 inputs a block whose largest value rounds up past
    65504 gives inf, exactly as ``dequantize`` would.

    ``compiled=True`` uses the torch.compile'd kernel (one fused pass, bit-identical).
    ``out``: a contiguous buffer of x's shape and dtype to write into (and return); reuse
    one across calls in hot loops, since fresh large allocations are slow on CPU.
    ``kernel``: as for :func:`quantize`; ``triton`` and ``reference`` quantize, then
    dequantize (the same values).
    """
    dim = _check_args(x, block_size, dim)
    fmt = as_format(fmt)
    rule = ScaleRule.parse(scale_rule)
    if out is not None:
        _check_out(out, x.shape, x.dtype, "out")
    if x.numel() == 0:
        return out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    which = backends.resolve(kernel, compiled, x.device)
    if which in (Kernel.TRITON, Kernel.REFERENCE):
        t = quantize(x, fmt, block_size=block_size, dim=dim, scale_rule=rule, pad=pad,
                     kernel=which)  # fmt: skip
        result = dequantize(t, x.dtype, kernel=which if which is Kernel.TRITON else None)
        return result if out is None else out.copy_(result)
    size = x.shape[dim]
    xb, _, padded_shape = _blocked(x, block_size, dim, pad)
    direct = out is not None and padded_shape == x.shape
    if _cpu_kernel(which):
        buf = (
            out.view(xb.shape) if direct else torch.empty(xb.shape, dtype=x.dtype, device=x.device)
        )
        cpu.fake_quantize(xb, fmt, rule, buf)
        if direct:
            return out
        result = _unpad(buf.reshape(padded_shape), dim, size)
        return result if out is None else out.copy_(result)
    fn = inductor.block_kernel(eager.fake_quantize_blocks, which is not Kernel.EAGER, fmt, rule,
                             x.dtype)  # fmt: skip
    if direct:
        fn(xb, fmt, rule, out=out.view(xb.shape))
        return out
    result = _unpad(fn(xb, fmt, rule).reshape(padded_shape), dim, size)
    return result if out is None else out.copy_(result)
