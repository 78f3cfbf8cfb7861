"""mxfp8.layers: recipes, GEMM backends, MXLinear and convert_model.

- ``recipe.py``: :class:`Recipe` (frozen, validated), the named presets, dict/TOML round-trip.
- ``gemm.py``: GEMM backends (``emulated``, ``scaled_mm``) and the cuBLAS block-scale layout.
- ``mx_function.py``: the 3-GEMM autograd Function for MX recipes.
- ``tensorwise_function.py``: the per-tensor (current / delayed) FP8 Function and its state.
- ``linear.py``: :class:`MXLinear`, the drop-in ``nn.Linear`` (telemetry hook documented there).
- ``convert.py``: :func:`convert_model`, the conversion report, delayed-scaling checkpoints.
- ``step.py``: :func:`step_window`, the span of one optimizer step (weight cache, delayed
  scaling's step boundaries); exported here as ``mxfp8.layers.step_window``.

Submodules are imported on use (``mxfp8.MXLinear`` resolves lazily), so importing the
package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"step_window": "mxfp8.layers.step"}

__all__ = ["step_window"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mxfp8.layers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from mxfp8.layers.step import step_window
