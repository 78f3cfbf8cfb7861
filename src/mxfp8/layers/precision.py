"""Switching a quantized layer to high precision mid-run, and checkpointing who was switched.

:func:`switch_to_high_precision` turns one converted module to bf16 for the rest of a run:
an ``MXLinear`` takes the ``bf16`` recipe (``F.linear`` under the run's autocast, as a kept
layer), an attention module with MX BMMs (:mod:`mxfp8.layers.attention_bmm`) drops its
``bmm_recipe``. Parameters, optimizer state and ``state_dict`` keys do not change. Each switch
is recorded on the module (``precision_switch``: step, reason, the recipe it left), which
:func:`precision_state_dict` collects for a checkpoint and :func:`load_precision_state_dict`
re-applies on resume, so a resumed run quantizes exactly the layers the uninterrupted run
does. The policy that decides (``mxfp8-adaptive``) is in :mod:`mxfp8.stats.adaptive`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe

_BF16 = recipe("bf16")


def switchable(module: nn.Module) -> bool:
    """Whether ``module`` quantizes something a switch can turn off."""
    if isinstance(module, MXLinear):
        return module.recipe.quantized
    return getattr(module, "bmm_recipe", None) is not None


def switch_to_high_precision(module: nn.Module, step: int, reason: str) -> dict[str, Any]:
    """Run ``module`` in high precision from now on; returns the record kept on it."""
    if not switchable(module):
        raise ValueError(f"{getattr(module, 'name', '') or type(module).__name__} has nothing "
                         "quantized to switch off")  # fmt: skip
    if isinstance(module, MXLinear):
        left = module.recipe.name
        module.recipe = _BF16
        module.delayed_state = None
        module._plans.clear()
        module._weight_cache.clear()
    else:
        left = module.bmm_recipe.name
        module.bmm_recipe = None
    record = {"step": int(step), "reason": str(reason), "from": left}
    module.precision_switch = record
    return record


def precision_state_dict(model: nn.Module) -> dict[str, dict[str, Any]]:
    """fqn -> switch record of every module switched so far (plain values only)."""
    return {name: dict(m.precision_switch) for name, m in model.named_modules()
            if getattr(m, "precision_switch", None) is not None}  # fmt: skip


def load_precision_state_dict(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    """Re-apply the switches of a checkpoint; a name the model lacks is an error."""
    modules = dict(model.named_modules())
    missing = sorted(set(state) - set(modules))
    if missing:
        raise KeyError(f"checkpointed precision switches name modules this model lacks: "
                       f"{missing[:5]}")  # fmt: skip
    for name, record in state.items():
        m = modules[name]
        if getattr(m, "precision_switch", None) is None:
            switch_to_high_precision(m, record["step"], record["reason"])


def load_layer_state(model: nn.Module, state: dict[str, Any]) -> None:
    """What a checkpoint's ``state.pt`` holds about the converted layers, re-applied to a model
    converted to the run's recipe: delayed-scaling histories (``scaling``) and adaptive
    switches to bf16 (``precision``). Training's resume and evaluation both call this, so an
    evaluated checkpoint quantizes exactly what its run quantized at that step."""
    from mxfp8.layers.convert import load_scaling_state_dict

    if state.get("scaling") is not None:  # a checkpoint without delayed scaling holds {}
        load_scaling_state_dict(model, state["scaling"])
    load_precision_state_dict(model, state.get("precision") or {})
