"""Element formats (E4M3, E5M2), the E8M0 shared scale, and the MX scale rules.

Everything here is a fact of the OCP Microscaling spec v1.0 or of OCP FP8; the quantizers
(``reference.py``, ``quantize.py``) derive all their constants from these objects so that a
format is described in exactly one place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import StrEnum

import torch

# E8M0: 8 exponent bits, bias 127, bits b encode 2^(b - 127); 0xFF is NaN; no zero, no sign.
E8M0_BIAS = 127
E8M0_NAN = 255
SCALE_EXP_MIN = -127  # bits 0x00
SCALE_EXP_MAX = 127  # bits 0xFE

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


class ScaleRule(StrEnum):
    """How the shared E8M0 exponent ``e`` of a block is chosen from its ``amax``.

    ``dest_max`` is the element format's largest finite value (1.75 * 2^emax_elem). In both
    rules ``e`` is then clamped to [-127, 127].

    - ``RCEIL`` ("rceil", the MXFP8 pre-training paper): ``e = ceil(log2(amax / dest_max))``,
      computed exactly. The scaled block max lands in (dest_max / 2, dest_max]: nothing
      saturates. This is the rule the paper needed for stable training at scale.
    - ``FLOOR`` ("floor", OCP MX v1.0): ``e = floor(log2(amax)) - emax_elem``. A block whose
      amax mantissa exceeds 1.75 saturates its largest element (up to ~12.5 % error).
    """

    RCEIL = "rceil"
    FLOOR = "floor"

    @classmethod
    def parse(cls, value: ScaleRule | str) -> ScaleRule:
        """Accept the enum or its string value (case-insensitive)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        choices = ", ".join(repr(r.value) for r in cls)
        raise ValueError(f"unknown scale rule {value!r}; expected one of {choices}")


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


@dataclass(frozen=True)
class ElemFormat:
    """An OCP FP8 element format ("fn" flavours: E4M3 has no infinities).

    Attributes are the format's facts; ``max_finite`` is the saturation value used by MX
    quantization (``dest_max``), ``emax`` the exponent of the largest normal.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_finite: float
    emax: int
    min_normal: float
    min_subnormal: float
    torch_dtype: torch.dtype
    # The 23-bit fp32 mantissa field of max_finite (0x600000 for 1.75): the exact rceil rule
    # compares a block amax's fp32 mantissa field against it. Derived, not passed.
    max_mantissa_bits: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_mantissa_bits", _f32_bits(self.max_finite) & 0x7FFFFF)
        if 1 + self.exp_bits + self.man_bits != 8:
            raise ValueError(f"{self.name}: an FP8 format has 8 bits")
        if self.max_finite != 1.75 * 2.0**self.emax:  # true of both OCP FP8 formats
            raise ValueError(f"{self.name}: max_finite must be 1.75 * 2^emax")
        if self.min_normal != 2.0 ** (1 - self.bias):
            raise ValueError(f"{self.name}: min_normal inconsistent with bias")
        if self.min_subnormal != 2.0 ** (1 - self.bias - self.man_bits):
            raise ValueError(f"{self.name}: min_subnormal inconsistent with bias")

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal."""
        return 1 - self.bias

    @staticmethod
    def from_name(fmt: ElemFormat | str | torch.dtype) -> ElemFormat:
        """Accept an ElemFormat, its name ("e4m3", "e5m2", any case) or its torch dtype."""
        if isinstance(fmt, ElemFormat):
            return fmt
        for known in (E4M3, E5M2):
            if isinstance(fmt, str) and fmt.lower() == known.name:
                return known
            if isinstance(fmt, torch.dtype) and fmt == known.torch_dtype:
                return known
        raise ValueError(f"unknown element format {fmt!r}; expected 'e4m3' or 'e5m2'")

    def __repr__(self) -> str:
        return self.name.upper()


E4M3 = ElemFormat(
    name="e4m3",
    exp_bits=4,
    man_bits=3,
    bias=7,
    max_finite=448.0,
    emax=8,
    min_normal=2.0**-6,
    min_subnormal=2.0**-9,
    torch_dtype=torch.float8_e4m3fn,
)

E5M2 = ElemFormat(
    name="e5m2",
    exp_bits=5,
    man_bits=2,
    bias=15,
    max_finite=57344.0,
    emax=15,
    min_normal=2.0**-14,
    min_subnormal=2.0**-16,
    torch_dtype=torch.float8_e5m2,
)

FORMATS: tuple[ElemFormat, ...] = (E4M3, E5M2)


def as_format(fmt: ElemFormat | str | torch.dtype) -> ElemFormat:
    """Shorthand for :meth:`ElemFormat.from_name`."""
    return ElemFormat.from_name(fmt)


def check_float_input(x: torch.Tensor) -> None:
    """Reject what the quantizers do not define: they take fp32, bf16 and fp16 only."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(
            f"quantization takes float32, bfloat16 or float16 tensors, got {x.dtype}"
            + ("; cast to float32 first" if x.dtype == torch.float64 else "")
        )
