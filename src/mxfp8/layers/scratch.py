"""Memory MX layers reuse across calls: one shared scratch pool, and one shared input copy.

**The scratch pool.** An MX layer writes three operands that die within the call: the fprop
copy of x (used by the forward GEMM, then dead) and the two copies of dy in backward. On
CPU, large fresh allocations are page-fault bound (docs/performance.md), so these go into
buffers that are reused. There is one buffer per role (``x``, ``dy``, ``dyT``) and dtype for
the whole process, grown to the largest operand seen, shared by every layer: layers run one
after another, and a role's operand is dead before the next layer writes it. Nothing is
pooled on GPUs (their caching allocator already reuses memory). :func:`pool_nbytes` says
how much the pool holds; ``benchmarks/memory.py`` and ``summary.json`` report it.

**The shared input.** q/k/v read the same x, and so do w1/w3. Their quantized copies of x
(the fprop operand, along K; the stored wgrad operand, along tokens) are identical when their
specs are, so the first layer makes them and the next ones reuse them: one stored copy saved
for backward instead of three (or two), and fewer quantization passes. The slot holds the
last input only, keyed on its storage, offset, shape, strides and version counter, and keeps
a reference to it so that the key cannot be reused by another tensor meanwhile; it is
cleared when a step window closes. Its fprop operand lives in the pool's ``x`` buffer, which
only the slot's owner writes: any other forward either hits the slot or replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ROLES = ("x", "dy", "dyT")


class ScratchPool:
    """Per-(role, dtype) flat CPU buffers, grown to the largest operand requested."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, like: torch.Tensor, dtype: torch.dtype | None = None):
        """A contiguous buffer shaped like ``like`` (of ``dtype``, default like's), or None
        off CPU. Its content is whatever the role's previous user left."""
        if like.device.type != "cpu":
            return None
        dtype = dtype or like.dtype
        key = (role, dtype)
        buf = self._buffers.get(key)
        n = like.numel()
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype)
        return buf[:n].view(like.shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


POOL = ScratchPool()


def pool_nbytes() -> int:
    """Bytes held by the process-wide scratch pool of MX layers (0 on GPU-only runs)."""
    return POOL.nbytes()


@dataclass
class _Shared:
    source: torch.Tensor  # a reference: keeps the key's storage from being reused
    key: tuple
    operand: torch.Tensor  # the fprop copy (along K), in the pool's x buffer
    stored: Any  # the backend's stored wgrad copy (along tokens), or None


class SharedInput:
    """The one-slot cache of the last input's quantized copies (see the module docstring)."""

    def __init__(self) -> None:
        self._slot: _Shared | None = None

    @staticmethod
    def key(x: torch.Tensor, *extra: Any) -> tuple:
        return (
            x.untyped_storage().data_ptr(),
            x.storage_offset(),
            tuple(x.shape),
            x.stride(),
            x.dtype,
            x.device,
            x._version,
            *extra,
        )

    def lookup(self, x: torch.Tensor, *extra: Any) -> _Shared | None:
        slot = self._slot
        if slot is not None and slot.key == self.key(x, *extra):
            return slot
        return None

    def put(self, x: torch.Tensor, extra: tuple, operand: torch.Tensor, stored: Any) -> None:
        self._slot = _Shared(x, self.key(x, *extra), operand, stored)

    def clear(self) -> None:
        self._slot = None


SHARED = SharedInput()
