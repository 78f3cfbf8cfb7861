"""The quantization kernels, named in one place.

``mxfp8.quantize(x, ..., kernel=NAME)`` (and ``dequantize``) picks one; every kernel gives
the same :class:`~mxfp8.numerics.tensor.MXTensor`, bit for bit (tested against
``reference``):

- ``reference`` (``numerics/reference.py``): the oracle, numpy and integer bit operations,
  spec-simple and slow (tests);
- ``eager`` (``numerics/kernels.py``): vectorized torch, run eagerly on any device; what
  ``compiled=False`` means;
- ``inductor`` (``numerics/kernels.py`` under ``torch.compile``): one fused pass; what
  ``compiled=True`` means off CPU;
- ``cpu`` (``numerics/two_pass.py``): two compiled passes, scales then elements, faster on
  CPU; what ``compiled=True`` means on CPU;
- ``triton`` (``numerics/triton_mx.py``): integer-only encoding, 2-D tensors, blocks along
  dim 0 or 1; on CUDA, or on CPU under ``TRITON_INTERPRET=1``; optional (``mxfp8[gpu]``).

Without ``kernel``, ``compiled`` decides as it always has: ``eager``, or ``cpu``/``inductor``
by device.
"""

from __future__ import annotations

import enum
import importlib.util
import os

import torch


class Kernel(enum.StrEnum):
    REFERENCE = "reference"
    EAGER = "eager"
    INDUCTOR = "inductor"
    CPU = "cpu"
    TRITON = "triton"


def triton_available() -> bool:
    """Whether the Triton kernels can run in this process: ``triton`` is installed, and there
    is a CUDA device or Triton's interpreter is on (``TRITON_INTERPRET=1`` before the first
    import of triton)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(kernel: Kernel | str | None, compiled: bool, device: torch.device) -> Kernel:
    """The kernel a call runs: ``kernel`` when given (checked), else by ``compiled`` and
    the device. Raises ``ValueError`` for an unknown or unusable choice."""
    if kernel is None:
        if not compiled:
            return Kernel.EAGER
        return Kernel.CPU if device.type == "cpu" else Kernel.INDUCTOR
    try:
        k = Kernel(kernel)
    except ValueError:
        names = ", ".join(repr(m.value) for m in Kernel)
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {names}") from None
    if k is Kernel.CPU and device.type != "cpu":
        raise ValueError(f"kernel 'cpu' runs on CPU tensors, this one is on {device}")
    if k is Kernel.TRITON and not triton_available():
        raise ValueError(
            "kernel 'triton' needs the triton package (pip install mxfp8[gpu]) and a CUDA "
            "device, or TRITON_INTERPRET=1 set before triton is imported (CPU, slow)"
        )
    return k
