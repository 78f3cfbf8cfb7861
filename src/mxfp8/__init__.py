"""mxfp8: pre-training LLMs with MXFP8 (OCP microscaling FP8).

The package is layered bottom-up; each floor imports only from the floors below it:

- ``mxfp8.numerics``: element formats, the spec-derived reference quantizer, fast MX and
  per-tensor quantizers, the ``MXTensor`` container.
- ``mxfp8.layers``: recipes, GEMM backends, ``MXLinear`` and ``convert_model``.
- ``mxfp8.stats``: numerics telemetry and divergence detection.
- ``mxfp8.train``: model, data, tokenizer, optimizer, checkpoints, the training loop.
- ``mxfp8.report``: plots and the HTML report, built from what runs wrote to disk.
- ``mxfp8.cli``: the ``mxfp8`` command.

Public names are resolved lazily (PEP 562) so that ``import mxfp8`` stays cheap and each
floor can be imported on its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # numerics
    "E4M3": "mxfp8.numerics.formats",
    "E5M2": "mxfp8.numerics.formats",
    "ElemFormat": "mxfp8.numerics.formats",
    "ScaleRule": "mxfp8.numerics.formats",
    "MXTensor": "mxfp8.numerics.tensor",
    "quantize": "mxfp8.numerics.quantize",
    "dequantize": "mxfp8.numerics.quantize",
    "fake_quantize": "mxfp8.numerics.quantize",
    "quantize_tensorwise": "mxfp8.numerics.tensorwise",
    "TensorwiseFP8": "mxfp8.numerics.tensorwise",
    "DelayedScaling": "mxfp8.numerics.tensorwise",
    # layers
    "Recipe": "mxfp8.layers.recipe",
    "recipe": "mxfp8.layers.recipe",
    "list_recipes": "mxfp8.layers.recipe",
    "MXLinear": "mxfp8.layers.linear",
    "convert_model": "mxfp8.layers.convert",
    "step_window": "mxfp8.layers.step",
    # trained models
    "load_pretrained": "mxfp8.model.pretrained",
}

__all__ = [  # the names of _EXPORTS, spelled out for tools that read __all__ statically
    "DelayedScaling",
    "E4M3",
    "E5M2",
    "ElemFormat",
    "MXLinear",
    "MXTensor",
    "Recipe",
    "ScaleRule",
    "TensorwiseFP8",
    "__version__",
    "convert_model",
    "dequantize",
    "fake_quantize",
    "list_recipes",
    "load_pretrained",
    "quantize",
    "quantize_tensorwise",
    "recipe",
    "step_window",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mxfp8' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next lookup skips __getattr__
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # static type checkers see the real names
    from mxfp8.layers.convert import convert_model
    from mxfp8.layers.linear import MXLinear
    from mxfp8.layers.recipe import Recipe, list_recipes, recipe
    from mxfp8.layers.step import step_window
    from mxfp8.model.pretrained import load_pretrained
    from mxfp8.numerics.formats import E4M3, E5M2, ElemFormat, ScaleRule
    from mxfp8.numerics.quantize import dequantize, fake_quantize, quantize
    from mxfp8.numerics.tensor import MXTensor
    from mxfp8.numerics.tensorwise import DelayedScaling, TensorwiseFP8, quantize_tensorwise
