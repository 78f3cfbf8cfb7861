"""Bit-level comparison helpers for the numerics tests.

Mismatches are reported field by field (sign / exponent / mantissa) so that an off-by-one
ulp, a wrong scale exponent and a sign error read differently at a glance.
"""

from __future__ import annotations

import numpy as np
import torch

from mxfp8.numerics.formats import ElemFormat

_FIELDS = {  # dtype -> (exponent bits, mantissa bits)
    "e4m3": (4, 3),
    "e5m2": (5, 2),
    torch.float32: (8, 23),
    torch.bfloat16: (8, 7),
    torch.float16: (5, 10),
}


def fields(bits: int, exp_bits: int, man_bits: int) -> str:
    sign = (bits >> (exp_bits + man_bits)) & 1
    exp = (bits >> man_bits) & ((1 << exp_bits) - 1)
    man = bits & ((1 << man_bits) - 1)
    return f"{sign}.{exp:0{exp_bits}b}.{man:0{man_bits}b}"


def _describe(got, want, where, layout, inputs, limit: int = 8) -> str:
    lines = []
    for idx in where[:limit]:
        i = tuple(int(v) for v in idx)
        extra = f" input={inputs[i]!r}" if inputs is not None else ""
        lines.append(
            f"  at {i}: got {fields(int(got[i]), *layout)} want {fields(int(want[i]), *layout)}"
            + extra
        )
    return f"{len(where)} mismatches\n" + "\n".join(lines)


def assert_codes_equal(got, want, fmt: ElemFormat, inputs=None) -> None:
    """FP8 codes (uint8 arrays or fp8 tensors) equal bit for bit."""
    if isinstance(got, torch.Tensor):
        got = got.view(torch.uint8).cpu().numpy()
    got, want = np.asarray(got).astype(np.int64), np.asarray(want).astype(np.int64)
    assert got.shape == want.shape, (got.shape, want.shape)
    where = np.argwhere(got != want)
    if len(where):
        raise AssertionError(_describe(got, want, where, _FIELDS[fmt.name], inputs))


def assert_scale_bits_equal(got, want) -> None:
    """E8M0 scale bits equal; printed as exponents."""
    if isinstance(got, torch.Tensor):
        got = got.view(torch.uint8).cpu().numpy()
    got, want = np.asarray(got).astype(np.int64), np.asarray(want).astype(np.int64)
    assert got.shape == want.shape, (got.shape, want.shape)
    where = np.argwhere(got != want)
    if len(where):
        shown = [
            f"  at {tuple(i)}: got 2^{got[tuple(i)] - 127} want 2^{want[tuple(i)] - 127}"
            for i in where[:8]
        ]
        raise AssertionError(f"{len(where)} scale mismatches\n" + "\n".join(shown))


def float_bits(t: torch.Tensor) -> np.ndarray:
    int_dtype = {
        torch.float32: torch.int32,
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
    }
    width = {torch.float32: 0xFFFFFFFF, torch.bfloat16: 0xFFFF, torch.float16: 0xFFFF}
    return t.contiguous().view(int_dtype[t.dtype]).cpu().numpy().astype(np.int64) & width[t.dtype]


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits; any NaN equals any NaN (payloads are not specified)."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    gn, wn = torch.isnan(got).cpu().numpy(), torch.isnan(want).cpu().numpy()
    gb, wb = float_bits(got), float_bits(want)
    bad = (gn != wn) | (~gn & ~wn & (gb != wb))
    where = np.argwhere(bad)
    if len(where):
        raise AssertionError(_describe(gb, wb, where, _FIELDS[got.dtype], None))


# --- every bf16 pattern, arranged in blocks (the exhaustive sweeps) ---------------------------

BLOCK = 32


def all_bf16() -> torch.Tensor:
    """All 65,536 bf16 bit patterns, in order."""
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _max_at(blocks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Swap each block's largest |value| into the given position."""
    blocks = blocks.clone()
    rows = torch.arange(blocks.shape[0])
    arg = blocks.float().abs().nan_to_num(nan=float("inf")).argmax(dim=1)
    big, other = blocks[rows, arg].clone(), blocks[rows, positions].clone()
    blocks[rows, positions], blocks[rows, arg] = big, other
    return blocks


def bf16_layouts() -> dict[str, torch.Tensor]:
    """(2048, 32) bf16 block arrangements of all 65,536 patterns."""
    x = all_bf16().reshape(-1, BLOCK)  # consecutive patterns: similar magnitudes per block
    perm = torch.randperm(1 << 16, generator=torch.Generator().manual_seed(0))
    shuffled = all_bf16()[perm].reshape(-1, BLOCK)  # mixed magnitudes, scattered NaN/Inf
    finite = torch.where(shuffled.isfinite(), shuffled, torch.zeros((), dtype=torch.bfloat16))
    pos = torch.arange(finite.shape[0]) % BLOCK
    return {
        "ordered": x,  # block max last (magnitudes grow with the pattern)
        "reversed": x.flip(1),  # block max first
        "shuffled": shuffled,
        "finite-max-everywhere": _max_at(finite, pos),  # block max at every position
    }


LAYOUTS = bf16_layouts()  # shared by the sweep and the Triton kernel tests
