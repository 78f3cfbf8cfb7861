"""convert_model: swap eligible ``nn.Linear`` modules for ``MXLinear``, in place, and say why.

Eligibility, in this order (the first rule that applies decides, and is the recorded reason):

1. the recipe does not quantize (``bf16``): everything is kept;
2. the fqn matches a ``keep_high_precision`` pattern (default: embeddings, the LM head);
3. the fqn matches none of the ``convert`` patterns (default ``layers.*``: transformer-block
   linears only);
4. MX recipes: ``in_features`` or ``out_features`` is not a multiple of the block size (both are
   reduction dims: K in fprop, N in dgrad).

Patterns are ``fnmatch`` globs on the module's fully qualified name (``layers.0.attention.wq``).
The report is returned on the model as ``model.mxfp8_report`` (a :class:`ConversionReport`)
and logged at INFO level.

Delayed-scaling state (amax histories) lives in the layers but outside ``state_dict`` (so the
keys stay those of ``nn.Linear``); :func:`scaling_state_dict` / :func:`load_scaling_state_dict`
save and restore it with a checkpoint. Save it after ``optimizer.step()``, outside the step
window (:func:`mxfp8.layers.step_window`): it then holds the finished step's pending amaxes,
which the next window opened after a restore commits, as the uninterrupted run does.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import Recipe, ScalingKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleDecision:
    """One linear layer: its fqn, shape and whether it was converted (with the reason)."""

    name: str
    in_features: int
    out_features: int
    converted: bool
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert_model` did, one entry per ``nn.Linear`` found."""

    recipe: str
    decisions: list[ModuleDecision] = field(default_factory=list)
    block_size: int = 0  # MX block size; 0 for per-tensor recipes (one fp32 scale a tensor)
    copies: int = 0  # quantized weight copies a layer caches in a step window

    @property
    def weight_cache_bytes(self) -> int:
        """The most the converted layers' weight caches hold at once, inside a step window:
        per layer, its cached FP8 copies (1 byte per weight) plus their E8M0 scales (1 byte
        per block of ``block_size``); nothing outside a window."""
        total = 0
        for d in self.decisions:
            if d.converted:
                n = d.in_features * d.out_features
                scales = n // self.block_size if self.block_size else 4  # or one fp32 scale
                total += self.copies * (n + scales)
        return total

    @property
    def converted(self) -> list[str]:
        return [d.name for d in self.decisions if d.converted]

    @property
    def kept(self) -> dict[str, str]:
        """fqn -> reason it stays in high precision."""
        return {d.name: d.reason for d in self.decisions if not d.converted}

    def __str__(self) -> str:
        lines = [
            f"convert_model(recipe={self.recipe}): {len(self.converted)} linear layers "
            f"converted, {len(self.kept)} kept in high precision; weight cache at most "
            f"{self.weight_cache_bytes / 2**20:.1f} MiB (FP8 copies, inside a step window only)"
        ]
        width = max((len(d.name) for d in self.decisions), default=0)
        for d in self.decisions:
            tag = "convert" if d.converted else "keep   "
            shape = f"{d.in_features}->{d.out_features}"
            lines.append(f"  {tag} {d.name:<{width}}  {shape:>12}  {d.reason}")
        return "\n".join(lines)


def _decide(name: str, mod: nn.Linear, recipe: Recipe) -> tuple[bool, str]:
    if not recipe.quantized:
        return False, f"recipe {recipe.name} does not quantize"
    for pat in recipe.keep_high_precision:
        if fnmatch.fnmatchcase(name, pat):
            return False, f"matches keep_high_precision pattern {pat!r}"
    hit = next((p for p in recipe.convert if fnmatch.fnmatchcase(name, p)), None)
    if hit is None:
        return False, f"matches no convert pattern {list(recipe.convert)}"
    if recipe.scaling is ScalingKind.MX:
        for dim_name in ("in_features", "out_features"):
            size = getattr(mod, dim_name)
            if size % recipe.block_size:
                return False, (
                    f"{dim_name}={size} is not a multiple of block_size {recipe.block_size}"
                )
    return True, f"matches convert pattern {hit!r}"


def plan_conversion(model: nn.Module, recipe: Recipe) -> ConversionReport:
    """Which ``nn.Linear`` modules of ``model`` :func:`convert_model` swaps for ``recipe``, and
    why each other one stays; changes nothing."""
    mx = recipe.scaling is ScalingKind.MX
    report = ConversionReport(
        recipe.name, block_size=recipe.block_size if mx else 0, copies=2 if mx else 1
    )
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name:
            convert, reason = _decide(name, mod, recipe)
        else:  # in place means through the parent; the root has none
            convert, reason = False, "the root module cannot be swapped in place"
        report.decisions.append(
            ModuleDecision(name, mod.in_features, mod.out_features, convert, reason)
        )
    return report


def convert_model(
    model: nn.Module,
    recipe: Recipe,
    *,
    compile_quantize: bool = False,
    quantize_kernel: str | None = None,
) -> nn.Module:
    """Swap eligible ``nn.Linear`` modules for ``MXLinear`` in place; returns ``model``.

    Parameters are shared, not copied (optimizer state built before or after stays valid).
    Already-converted ``MXLinear`` modules are re-targeted to ``recipe`` only if eligible.
    The report is at ``model.mxfp8_report``. ``compile_quantize`` runs the MX fake-quantize
    through torch.compile (fast on CPU once compiled; see MXLinear); ``quantize_kernel``
    names the kernel instead (:mod:`mxfp8.numerics.backends`; None: by device).
    """
    report = plan_conversion(model, recipe)
    for d in report.decisions:
        if not d.name:
            continue  # the root: nothing to swap it in
        name, mod, convert = d.name, model.get_submodule(d.name), d.converted
        if isinstance(mod, MXLinear) and not convert:
            new: nn.Linear = nn.Linear(
                mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta"
            )
            new.weight, new.bias = mod.weight, mod.bias
            new.train(mod.training)
        elif convert:
            new = MXLinear.from_linear(mod, recipe, name=name, compile_quantize=compile_quantize,
                                       quantize_kernel=quantize_kernel)  # fmt: skip
        else:
            continue
        _set_submodule(model, name, new)
    model.mxfp8_report = report  # type: ignore[assignment]
    log.info("%s", report)
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def mx_layers(model: nn.Module) -> dict[str, MXLinear]:
    """fqn -> MXLinear for every converted layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MXLinear)}


def scaling_state_dict(model: nn.Module) -> dict[str, Any]:
    """Delayed-scaling state of every layer that has one: {fqn: state}. Empty otherwise.

    Tensors and plain Python values only (``torch.save``-able with ``weights_only=True``).
    """
    return {
        name: layer.delayed_state.state_dict()
        for name, layer in mx_layers(model).items()
        if layer.delayed_state is not None
    }


def load_scaling_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore :func:`scaling_state_dict` output; the set of layers must match exactly."""
    layers = {n: m for n, m in mx_layers(model).items() if m.delayed_state is not None}
    if set(layers) != set(state):
        missing, extra = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
        raise ValueError(f"scaling state mismatch: missing {missing}, unexpected {extra}")
    for name, layer in layers.items():
        layer.delayed_state.load_state_dict(state[name])
        layer._weight_cache.clear()  # (inside a window) quantized with the old scale
