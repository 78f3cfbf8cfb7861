"""GEMM backends: how a quantized matrix product is actually computed.

Every GEMM of a linear layer is written in "NT" form, ``out = a @ b.T`` with ``a`` of shape
[M, K] and ``b`` of shape [N, K], both quantized along K (their last dimension). A backend
turns a high-precision operand into its own quantized representation (:meth:`quantize_mx`)
and multiplies two of them (:meth:`mm_nt`). Callers pass operands that are already in NT
orientation; a column-wise copy is simply a transposed *high-precision* view quantized along
its last dimension (never a transposed quantized tensor: MX blocks do not survive a transpose).

- ``emulated``: the quantized operand is its dequantized value (``fake_quantize``, the fast
  path, bit-equal to ``quantize(...).dequantize``). A dequantized FP8 value has at most 4
  significant bits times a power of two, so it is exact in bf16, and products of two are exact
  in fp32: a matmul of those bf16 operands with fp32 accumulation reproduces MX hardware up to
  the order of accumulation. Output bf16: a bf16 matmul (fp32 accumulation, one rounding at
  the end). Output fp32/fp16: the same values in an fp32 matmul. The CPU default, GPU fallback.
- ``scaled_mm``: ``torch._scaled_mm`` with FP8 data and ``float8_e8m0fnu`` block scales in
  the swizzled layout cuBLAS expects (:func:`to_blocked_scales`). Blackwell (SM100+) only;
  choosing it anywhere else raises :class:`BackendUnavailableError` saying what to use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from mxfp8.layers.recipe import Backend
from mxfp8.layers.scale_layout import (  # noqa: F401 - re-exported: part of this API
    blocked_scale_offset,
    from_blocked_scales,
    to_blocked_scales,
)
from mxfp8.numerics.backends import Kernel
from mxfp8.numerics.backends import parse as parse_kernel
from mxfp8.numerics.tensor import MXTensor

log = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """The requested GEMM backend cannot run on this machine."""


def _source(hp: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(tensor to quantize, dim, transposed): a transposed view is quantized as its
    contiguous source along dim 0, which is the same set of blocks."""
    if not hp.is_contiguous() and hp.t().is_contiguous():
        return hp.t(), 0, True
    return hp, -1, False


@dataclass(frozen=True)
class _NTOperand:
    """scaled_mm operand: row-major FP8 data [rows, K] and its [rows, K/32] E8M0 scales."""

    data: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class StoredMX:
    """An emulated-backend operand kept beyond the call that made it (the wgrad copy of x,
    cached weight copies): the FP8 codes and E8M0 scales of the *source* tensor, blocked
    along ``q.dim``, 8.25 bits per element; ``transposed``: the operand is the source's
    transpose (a column-wise copy). :meth:`EmulatedBackend.load_mx` dequantizes it."""

    q: Any  # MXTensor of the source
    transposed: bool


@dataclass(frozen=True)
class MXSpec:
    """How to MX-quantize one operand: element format (ElemFormat), block size, scale rule."""

    fmt: Any
    block_size: int
    scale_rule: str


def _quantize_kwargs(spec: MXSpec) -> dict[str, Any]:
    # pad: a token count that is not a multiple of the block size zero-pads the last block of
    # the wgrad reduction (zeros add nothing); K and N are checked to be multiples upstream
    return dict(block_size=spec.block_size, scale_rule=spec.scale_rule, pad=True)


def _emulated_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """bf16 output: bf16 operands (fast path). Otherwise fp32 operands: dequantized values
    are exact in both, and fp16 cannot hold every scaled E4M3/E5M2 value."""
    return torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32


class EmulatedBackend:
    """Dequantize, then a high-precision matmul with fp32 accumulation (see module doc)."""

    name = "emulated"

    def __init__(self, compiled: bool = False, kernel: Kernel | str | None = None) -> None:
        # the quantization kernel (mxfp8.numerics.backends): None lets ``compiled`` decide,
        # per tensor device: eager; or compiled, the two-pass CPU kernel on CPU and Inductor
        # elsewhere (the documented default on CUDA until a GPU run measures Triton against it)
        self.kernel = None if kernel is None else parse_kernel(kernel)
        self.compiled = compiled or self.kernel not in (None, Kernel.EAGER, Kernel.REFERENCE)

    def _kw(self) -> dict[str, Any]:
        """How the numerics calls run: inside a caller's torch.compile, the branch-free math
        that compiler traces and fuses; else this backend's kernel."""
        if torch.compiler.is_compiling():
            return {"compiled": True}
        return {"compiled": self.compiled, "kernel": self.kernel}

    def quantize_mx(
        self,
        hp: torch.Tensor,
        spec: MXSpec,
        out_dtype: torch.dtype,
        *,
        want_q: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Quantize a 2-D operand along its last dim; returns (operand, MXTensor or None).

        ``out``: optional scratch buffer shaped like the (contiguous) source, used when the
        source already has the operand dtype; fresh large allocations are slow on CPU.

        ``hp`` may be a transposed view; the blocks are then taken along the source's dim 0
        directly (no copy of the high-precision tensor is made first), and the MXTensor is
        the source's (shape of the source, ``dim=0``).
        """
        from mxfp8.numerics.quantize import fake_quantize, quantize

        dt = _emulated_dtype(out_dtype)
        src, dim, transposed = _source(hp)
        if want_q:  # telemetry wants the MXTensor itself; bit-equal to the fake path
            q = quantize(src, spec.fmt, dim=dim, **_quantize_kwargs(spec))
            deq = q.dequantize(dt)  # the eager path: bit-equal to every kernel (tested)
        else:
            q = None
            kw = _quantize_kwargs(spec)
            if out is not None and (
                out.shape != src.shape or out.dtype != src.dtype or dt != src.dtype
            ):
                out = None
            deq = fake_quantize(src, spec.fmt, dim=dim, out=out, **kw, **self._kw())
            if deq.dtype != dt:
                deq = deq.to(dt)  # exact: MX values fit in bf16 and fp32
        return (deq.t() if transposed else deq), q

    def quantize_pair(
        self,
        hp: torch.Tensor,
        spec_row: MXSpec,
        spec_col: MXSpec,
        out_dtype: torch.dtype,
        *,
        out_row: torch.Tensor | None = None,
        out_col: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both operands of one 2-D tensor [R, C] from the shared row+column kernel:
        (hp along C, as [R, C]; hp along R, as the [C, R] view of an [R, C] buffer), both in
        the operand dtype (bf16 for a bf16 output, else fp32; the cast is exact).

        Bit-equal to ``quantize_mx(hp)`` and ``quantize_mx(hp.t())`` (tested). Returns None
        when that kernel does not apply (compiled quantizers off, a caller's torch.compile,
        different specs, a non-contiguous or unaligned tensor, not CPU), and the caller then
        makes the two calls. ``out_row``/``out_col``: optional scratch buffers shaped like
        ``hp``, used when they have the operand dtype.
        """
        from mxfp8.numerics.rowcol import fake_quantize_rowcol

        bs = spec_row.block_size
        if not self._pair_applies(hp, spec_row, spec_col):
            return None
        dt = _emulated_dtype(out_dtype)
        bufs = tuple(
            b if b is not None and b.shape == hp.shape and b.dtype == dt else None
            for b in (out_row, out_col)
        )
        row, col = fake_quantize_rowcol(
            hp,
            spec_row.fmt,
            block_size=bs,
            scale_rule=spec_row.scale_rule,
            out_dtype=dt,
            out=tuple(torch.empty_like(hp, dtype=dt) if b is None else b for b in bufs),
            **self._kw(),
        )
        return row, col.t()

    # --- operands kept beyond the call: stored as MX, dequantized when used -------------

    def store_mx(
        self, hp: torch.Tensor, spec: MXSpec, *, want_q: bool = False
    ) -> tuple[StoredMX, Any]:
        """Quantize a 2-D operand along its last dim into codes and scales (see
        :class:`StoredMX`); returns (stored, the MXTensor for an observer)."""
        from mxfp8.numerics.quantize import quantize

        src, dim, transposed = _source(hp)
        q = quantize(src, spec.fmt, dim=dim, **_quantize_kwargs(spec), **self._kw())
        return StoredMX(q, transposed), q

    def load_mx(self, stored: StoredMX, out_dtype: torch.dtype) -> torch.Tensor:
        """The GEMM operand of a stored copy: its dequantized values (exact in the operand
        dtype), transposed back when the copy was column-wise. One pass over the codes."""
        from mxfp8.numerics.quantize import dequantize

        deq = dequantize(stored.q, _emulated_dtype(out_dtype), **self._kw())
        return deq.t() if stored.transposed else deq

    def store_pair(
        self, hp: torch.Tensor, spec_row: MXSpec, spec_col: MXSpec
    ) -> tuple[StoredMX, StoredMX] | None:
        """Both stored copies of a 2-D tensor [R, C] from shared passes: along C (as [R, C])
        and along R (as [C, R]); None when the shared kernel does not apply."""
        from mxfp8.numerics.rowcol import quantize_rowcol

        if not self._pair_applies(hp, spec_row, spec_col):
            return None
        row, col = quantize_rowcol(hp, spec_row.fmt, block_size=spec_row.block_size,
                                   scale_rule=spec_row.scale_rule, **self._kw())  # fmt: skip
        return StoredMX(row, False), StoredMX(col, True)

    def quantize_and_store(
        self,
        x: torch.Tensor,
        spec_row: MXSpec,
        spec_col: MXSpec,
        out_dtype: torch.dtype,
        *,
        out_row: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, StoredMX] | None:
        """x [M, K] along K as an operand to use now (in ``out_row`` if it fits), and x^T
        [K, M] along M (tokens, zero-padding a partial last block) as a stored copy, from
        shared passes where the shared kernel applies; None when the two copies need
        different formats (the caller then makes them one by one)."""
        from mxfp8.numerics.rowcol import fake_and_quantize_rowcol

        if spec_row != spec_col or x.dim() != 2:
            return None
        dt = _emulated_dtype(out_dtype)
        if out_row is not None and (out_row.shape != x.shape or out_row.dtype != dt):
            out_row = None
        row, col = fake_and_quantize_rowcol(x, spec_row.fmt, block_size=spec_row.block_size,
                                            scale_rule=spec_row.scale_rule, out_dtype=dt,
                                            out_row=out_row, **self._kw())  # fmt: skip
        return row, StoredMX(col, True)

    @staticmethod
    def pack(stored: StoredMX) -> tuple[tuple[torch.Tensor, ...], Any]:
        """(tensors for ``save_for_backward``, a tensor-free description to rebuild it)."""
        q = stored.q
        return (q.data, q.scale), (q.fmt, q.block_size, q.dim, q.scale_rule, stored.transposed)

    @staticmethod
    def unpack(tensors: tuple[torch.Tensor, ...], meta: Any) -> StoredMX:
        fmt, block_size, dim, rule, transposed = meta
        return StoredMX(MXTensor(tensors[0], tensors[1], fmt, block_size, dim, rule), transposed)

    def _pair_applies(self, hp: torch.Tensor, spec_row: MXSpec, spec_col: MXSpec) -> bool:
        """Whether one shared kernel makes both copies of ``hp``: the two-pass CPU kernel
        (compiled quantizers, CPU tensors) or Triton (when chosen); not inside a caller's
        torch.compile, which fuses the separate calls itself."""
        if torch.compiler.is_compiling() or not self.compiled:
            return False
        on_cpu = hp.device.type == "cpu" and self.kernel in (None, Kernel.CPU)
        bs = spec_row.block_size
        return (
            (on_cpu or self.kernel is Kernel.TRITON)
            and spec_row == spec_col
            and hp.dim() == 2
            and hp.is_contiguous()
            and hp.shape[0] % bs == 0
            and hp.shape[1] % bs == 0
        )

    def mm_nt(self, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        out = torch.mm(a, b.t())  # [M, K] x [K, N], fp32 accumulation in both dtypes
        return out if out.dtype == out_dtype else out.to(out_dtype)


def _is_sm100_plus(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 10


class ScaledMMBackend:
    """``torch._scaled_mm`` on FP8 data with swizzled E8M0 block scales (SM100+ only).

    ``mm``: the matmul to call (``torch._scaled_mm``; tests pass
    :func:`mxfp8.layers.scaled_mm_model.scaled_mm_model` with ``require_sm100=False`` to run
    the backend on CPU). A reduction dim that is not a multiple of 32 (the token count, in
    the wgrad GEMM) is zero-padded, as the emulated backend pads its last block.
    """

    name = "scaled_mm"

    def __init__(self, mm=None, *, require_sm100: bool = True) -> None:
        self.mm = mm if mm is not None else torch._scaled_mm
        self.require_sm100 = require_sm100

    def check(self, device: torch.device) -> None:
        if _is_sm100_plus(device) or not self.require_sm100:
            return
        if device.type == "cuda" and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(device)
            where = f"a CUDA device with compute capability {cap[0]}.{cap[1]}"
        else:
            where = f"device type {device.type!r}"
        raise BackendUnavailableError(
            f"GEMM backend 'scaled_mm' needs MX block-scaled tensor cores (NVIDIA Blackwell, "
            f"SM100+), but the tensors are on {where}. Use backend='emulated' (exact up to "
            "accumulation order) or backend='auto'."
        )

    def quantize_mx(
        self,
        hp: torch.Tensor,
        spec: MXSpec,
        out_dtype: torch.dtype,
        *,
        want_q: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[Any, Any]:
        from mxfp8.numerics.quantize import quantize

        self.check(hp.device)
        if spec.block_size != 32:
            raise ValueError(f"scaled_mm needs MX blocks of 32, got block_size {spec.block_size}")
        src, dim, transposed = _source(hp)
        q = quantize(src, spec.fmt, dim=dim, **_quantize_kwargs(spec))
        if transposed:  # transposing data *with* its scales keeps every block intact
            data, scale = q.data.t().contiguous(), q.scale.t().contiguous()
        else:
            data, scale = q.data, q.scale
        short = (-data.shape[1]) % 32  # the last block's padding (zeros: they add nothing)
        if short:
            padded = torch.nn.functional.pad(data.view(torch.uint8), (0, short))
            data = padded.view(data.dtype)
        return _NTOperand(data, scale), (q if want_q else None)

    def quantize_pair(self, hp, spec_row, spec_col, out_dtype, *, out_row=None, out_col=None):
        """No shared row+column kernel here: the caller quantizes each copy itself."""
        return None

    # its operands are FP8 codes and scales already: storing one is keeping it
    def store_mx(self, hp: torch.Tensor, spec: MXSpec, *, want_q: bool = False):
        return self.quantize_mx(hp, spec, torch.bfloat16, want_q=want_q)

    def load_mx(self, stored: Any, out_dtype: torch.dtype) -> Any:
        return stored

    def store_pair(self, hp, spec_row, spec_col):
        return None

    def quantize_and_store(self, x, spec_row, spec_col, out_dtype, *, out_row=None):
        return None

    @staticmethod
    def pack(stored: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        return (stored.data, stored.scale), None

    @staticmethod
    def unpack(tensors: tuple[torch.Tensor, ...], meta: Any) -> Any:
        return _NTOperand(tensors[0], tensors[1])

    def mm_nt(self, a: Any, b: Any, out_dtype: torch.dtype) -> torch.Tensor:
        sa = to_blocked_scales(a.scale)
        sb = to_blocked_scales(b.scale)
        # _scaled_mm wants a row-major [M, K] and a column-major [K, N]
        return self.mm(a.data, b.data.t(), sa, sb, out_dtype=out_dtype)


def select_backend(
    backend: Backend | str,
    device: torch.device,
    compiled: bool = False,
    kernel: Kernel | str | None = None,
) -> EmulatedBackend | ScaledMMBackend:
    """The backend object for a recipe's ``backend`` field on ``device``; ``compiled`` and
    ``kernel`` choose the emulated backend's quantization kernel (see EmulatedBackend).

    ``auto`` picks ``scaled_mm`` on SM100+ GPUs and ``emulated`` everywhere else; an explicit
    ``scaled_mm`` off SM100 raises :class:`BackendUnavailableError`.
    """
    backend = Backend(backend)
    if backend is Backend.SCALED_MM:
        b = ScaledMMBackend()
        b.check(device)
        return b
    if backend is Backend.AUTO and _is_sm100_plus(device):
        log.info("GEMM backend auto on %s (SM100+): scaled_mm", device)
        return ScaledMMBackend()
    return EmulatedBackend(compiled=compiled, kernel=kernel)
