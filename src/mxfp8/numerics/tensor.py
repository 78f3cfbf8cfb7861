"""MXTensor: FP8 elements plus their E8M0 block scales, and how they were made.

A container, not a tensor subclass: it holds exactly what MX hardware consumes (``data`` and
``scale``) so that GEMM backends can use it directly, and it remembers the block layout so
that it can always be dequantized without extra arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mxfp8.numerics.backends import eager
from mxfp8.numerics.formats import E8M0_BIAS, ElemFormat, ScaleRule


@dataclass(frozen=True)
class MXTensor:
    """An MX-quantized tensor.

    Attributes:
        data: FP8 elements (``fmt.torch_dtype``), the source tensor's shape.
        scale: ``torch.float8_e8m0fnu``, the source shape with ``size[dim]`` replaced by
            ``ceil(size[dim] / block_size)``; ``scale.view(torch.uint8)`` are the E8M0 bits.
            Bits 255 (NaN) mark a block that held NaN or Inf.
        fmt: the element format.
        block_size: elements per scale, consecutive along ``dim``.
        dim: the blocked dimension, non-negative.
        scale_rule: the rule that chose the scales.

    When the source was quantized with ``pad=True`` and ``size[dim]`` is not a multiple of
    ``block_size``, the last block of each row was zero-padded before its scale was chosen;
    ``data`` keeps the unpadded shape.
    """

    data: torch.Tensor
    scale: torch.Tensor
    fmt: ElemFormat
    block_size: int
    dim: int
    scale_rule: ScaleRule

    def __post_init__(self) -> None:
        if self.data.dtype != self.fmt.torch_dtype:
            raise TypeError(f"data is {self.data.dtype}, expected {self.fmt.torch_dtype}")
        if self.scale.dtype != torch.float8_e8m0fnu:
            raise TypeError(f"scale is {self.scale.dtype}, expected torch.float8_e8m0fnu")
        if not 0 <= self.dim < max(self.data.dim(), 1):
            raise ValueError(f"dim {self.dim} out of range for shape {tuple(self.data.shape)}")
        expected = list(self.data.shape)
        if expected:
            expected[self.dim] = -(-expected[self.dim] // self.block_size)
        if list(self.scale.shape) != expected:
            raise ValueError(
                f"scale shape {tuple(self.scale.shape)} does not match data shape "
                f"{tuple(self.data.shape)} with block_size {self.block_size} along dim {self.dim}"
            )

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def scale_bits(self) -> torch.Tensor:
        """The raw E8M0 bits (uint8 view, no copy)."""
        return self.scale.view(torch.uint8)

    def scale_exponent(self) -> torch.Tensor:
        """Unbiased scale exponents as int32 (bits - 127); a NaN scale (bits 255) reads 128."""
        return self.scale_bits().to(torch.int32) - E8M0_BIAS

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """data * 2^scale_exponent, computed in fp32 (exact) and cast to ``dtype``.

        Blocks whose scale is NaN come back as NaN everywhere.
        """
        if self.data.numel() == 0:
            return torch.empty(self.data.shape, dtype=dtype, device=self.data.device)
        shape = self.data.shape
        size = shape[self.dim]
        nblocks = self.scale.shape[self.dim]
        data = self.data
        if size != nblocks * self.block_size:  # padded source: pad the data back with zeros
            pad_shape = list(shape)
            pad_shape[self.dim] = nblocks * self.block_size - size
            zeros = torch.zeros(pad_shape, dtype=data.dtype, device=data.device)
            data = torch.cat([data, zeros], dim=self.dim)
        outer = shape[: self.dim].numel() * nblocks
        inner = shape[self.dim + 1 :].numel()
        qb = data.reshape(outer, self.block_size, inner)  # one scale per block along dim 1
        bits = self.scale_bits().reshape(outer, 1, inner)
        out = eager.dequantize_blocks(qb, bits, dtype).reshape(data.shape)
        if data is not self.data:
            out = out.narrow(self.dim, 0, size).contiguous()
        return out

    def to(self, device: torch.device | str) -> MXTensor:
        """The same MXTensor on another device."""
        return MXTensor(
            self.data.to(device),
            self.scale.to(device),
            self.fmt,
            self.block_size,
            self.dim,
            self.scale_rule,
        )
