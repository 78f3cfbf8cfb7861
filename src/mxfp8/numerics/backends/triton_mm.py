"""A Triton MX GEMM for GPUs without MX tensor cores (Hopper and older): FP8 codes and E8M0
scales go in, are dequantized in registers, and meet in a bf16 MMA with fp32 accumulation.

``C = A @ B^T`` in the NT form of :mod:`mxfp8.layers.mx_function`: A [M, K] and B [N, K],
both quantized along K (the reduction) in blocks of 32. The emulated backend writes both
dequantized operands to memory as bf16 and then runs a bf16 matmul; this kernel reads only
the 8.25-bit operands. Each step of the K loop loads one 32-wide block column of A and B
(codes and their one scale per row), decodes them with the integer decoder of
:mod:`~mxfp8.numerics.backends.triton_mx`, multiplies by the scale (a power of two: exact), casts to
bf16 (exact: an FP8 value times a power of two fits bf16's 8-bit significand, outside bf16's
subnormal range) and accumulates ``tl.dot`` in fp32.

Numbers. Every product of two dequantized operands is exact in fp32; only the order of the
fp32 sums differs from the emulated backend's matmul, so the two agree within the fp32
accumulation bound ``|C - exact| <= K * 2^-24 * (|A| @ |B|^T)`` (tested on CPU through the
interpreter). Under the interpreter the MMA is an fp32 ``tl.dot`` (``input_precision="ieee"``):
the interpreter's bf16 casts and bf16 ``tl.dot`` are wrong (a 16 x 16 bf16 dot came out
off by 1e10), and since the operands are exact in bf16 an exact fp32 dot has the same
products; on CUDA the operands go to the bf16 tensor cores. Optional, like
:mod:`~mxfp8.numerics.backends.triton_mx`; not yet run on a GPU, and not yet used by the MX layers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxfp8.numerics.backends.triton_mx import decode_fp8, e8m0_to_float
from mxfp8.numerics.formats import ElemFormat

BLOCK = 32  # the MX block along K: one scale per row per step of the K loop


@triton.jit
def mx_mm_nt_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, KB,
    A_MAN: tl.constexpr, A_BIAS: tl.constexpr, A_E4M3: tl.constexpr,
    B_MAN: tl.constexpr, B_BIAS: tl.constexpr, B_E4M3: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MMA_BF16: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, KB):
        ka = a_ptr + rm[:, None] * K + kb * BK + rk[None, :]
        a = tl.load(ka, mask=rm[:, None] < M, other=0).to(tl.int32)
        sa = tl.load(as_ptr + rm * KB + kb, mask=rm < M, other=127).to(tl.int32)
        av = decode_fp8(a, A_MAN, A_BIAS, A_E4M3) * e8m0_to_float(sa)[:, None]
        kbp = b_ptr + rn[:, None] * K + kb * BK + rk[None, :]
        b = tl.load(kbp, mask=rn[:, None] < N, other=0).to(tl.int32)
        sb = tl.load(bs_ptr + rn * KB + kb, mask=rn < N, other=127).to(tl.int32)
        bv = decode_fp8(b, B_MAN, B_BIAS, B_E4M3) * e8m0_to_float(sb)[:, None]
        if MMA_BF16:  # exact casts (see the module doc); the GPU's bf16 tensor cores
            acc += tl.dot(av.to(tl.bfloat16), tl.trans(bv.to(tl.bfloat16)))
        else:  # the interpreter: its bf16 dot is wrong, an exact fp32 dot has the same products
            acc += tl.dot(av, tl.trans(bv), input_precision="ieee")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask)


def mx_mm_nt(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    b_codes: torch.Tensor,
    b_scales: torch.Tensor,
    a_fmt: ElemFormat,
    b_fmt: ElemFormat,
    out_dtype: torch.dtype = torch.float32,
    *,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """``A @ B^T`` from MX operands: codes (uint8) A [M, K], B [N, K] and their E8M0 scale
    bits (uint8) [M, K/32], [N, K/32]. Accumulates in fp32; returns ``out_dtype``."""
    (M, K), (N, K2) = a_codes.shape, b_codes.shape
    if K != K2 or K % BLOCK:
        raise ValueError(f"A [M, K] and B [N, K] need one K, a multiple of {BLOCK}: got "
                         f"{tuple(a_codes.shape)} and {tuple(b_codes.shape)}")  # fmt: skip
    if a_scales.shape != (M, K // BLOCK) or b_scales.shape != (N, K // BLOCK):
        raise ValueError(f"scales must be [M, K/32] and [N, K/32], got {tuple(a_scales.shape)}"
                         f" and {tuple(b_scales.shape)}")  # fmt: skip
    out = torch.empty((M, N), dtype=torch.float32, device=a_codes.device)
    if M and N:
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        mx_mm_nt_kernel[grid](
            a_codes.contiguous(), a_scales.contiguous(), b_codes.contiguous(),
            b_scales.contiguous(), out, M, N, K, K // BLOCK,
            A_MAN=a_fmt.man_bits, A_BIAS=a_fmt.bias, A_E4M3=a_fmt.name == "e4m3",
            B_MAN=b_fmt.man_bits, B_BIAS=b_fmt.bias, B_E4M3=b_fmt.name == "e4m3",
            BM=block_m, BN=block_n, BK=BLOCK, MMA_BF16=a_codes.is_cuda,
        )  # fmt: skip
    return out if out_dtype == torch.float32 else out.to(out_dtype)
