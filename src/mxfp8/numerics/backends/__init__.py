"""The quantization kernels, named in one place, and which one a call runs.

``mxfp8.quantize(x, ..., kernel=NAME)`` (and ``dequantize``, and the two-copy entries of
:mod:`mxfp8.numerics.rowcol`) picks one; every kernel gives the same
:class:`~mxfp8.numerics.tensor.MXTensor`, bit for bit (tested against ``reference``):

=============  ==================================  =========================================
kernel         module                              runs on / chosen by default when
=============  ==================================  =========================================
``reference``  ``numerics/reference.py``           any device (numpy, slow): the oracle, tests
``eager``      ``numerics/backends/eager.py``      any device: ``compiled=False``
``inductor``   ``backends/eager.py`` under         CUDA and other devices: ``compiled=True``
               ``backends/inductor.py``            off CPU, and inside a caller's compile
``cpu``        ``numerics/backends/cpu.py``        CPU: ``compiled=True`` (two compiled passes,
                                                   scales then elements; faster there)
``triton``     ``numerics/backends/triton_mx.py``  CUDA, or CPU under ``TRITON_INTERPRET=1``;
                                                   only when asked (optional: ``mxfp8[gpu]``)
=============  ==================================  =========================================

``backends/triton_mm.py`` holds the MX GEMM that consumes FP8 codes and scales directly.
Without ``kernel``, ``compiled`` decides: ``eager``, or ``cpu``/``inductor`` by device. The
linear layers pass their ``quantize_kernel`` here (``MXLinear``, ``run.quantize_kernel``).
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


def parse(kernel: Kernel | str) -> Kernel:
    """The :class:`Kernel` named ``kernel``; ``ValueError`` listing the names otherwise."""
    try:
        return Kernel(kernel)
    except ValueError:
        names = ", ".join(repr(m.value) for m in Kernel)
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {names}") from None


def resolve(kernel: Kernel | str | None, compiled: bool, device: torch.device) -> Kernel:
    """The kernel a call runs: ``kernel`` when given (checked), else by ``compiled`` and
    the device. Raises ``ValueError`` for an unknown or unusable choice."""
    if kernel is None:
        if not compiled:
            return Kernel.EAGER
        return Kernel.CPU if device.type == "cpu" else Kernel.INDUCTOR
    k = parse(kernel)
    if k is Kernel.CPU and device.type != "cpu":
        raise ValueError(f"kernel 'cpu' runs on CPU tensors, this one is on {device}")
    if k is Kernel.TRITON and not triton_available():
        raise ValueError(
            "kernel 'triton' needs the triton package (pip install mxfp8[gpu]) and a CUDA "
            "device, or TRITON_INTERPRET=1 set before triton is imported (CPU, slow)"
        )
    return k
