"""convert_model: swap eligible ``nn.Linear`` modules for ``MXLinear``, in place, and say why.

Eligibility, in this order (the first rule that applies decides, and is the recorded reason):

1. neither the recipe nor any of its overrides quantizes (``bf16``): everything is kept;
2. the fqn matches a ``keep_high_precision`` pattern (default: embeddings, the LM head);
3. the fqn matches none of the ``convert`` patterns (default ``layers.*``: transformer-block
   linears only);
4. the layer's own recipe (:func:`layer_recipe`: ``keep_first_blocks`` / ``keep_last_blocks``,
   then the first matching ``[[recipe.overrides]]`` entry, else the recipe) does not
   quantize;
5. MX recipes: ``in_features`` or ``out_features`` is not a multiple of the block size (both are
   reduction dims: K in fprop, N in dgrad).

Each converted layer runs its own recipe (``ModuleDecision.recipe``; the report prints it).

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
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import Recipe, ScalingKind, WeightBlock
from mxfp8.layers.recipe import recipe as named_recipe

log = logging.getLogger(__name__)
_BF16 = named_recipe("bf16")


@dataclass(frozen=True)
class ModuleDecision:
    """One linear layer: its fqn, shape and whether it was converted (with the reason)."""

    name: str
    in_features: int
    out_features: int
    converted: bool
    reason: str
    recipe: str = ""  # the recipe the layer runs (per-layer overrides); "" when kept
    cache_bytes: int = 0  # what its weight cache holds at most inside a step window


@dataclass
class ConversionReport:
    """What :func:`convert_model` did, one entry per ``nn.Linear`` found."""

    recipe: str
    decisions: list[ModuleDecision] = field(default_factory=list)
    block_size: int = 0  # MX block size; 0 for per-tensor recipes (one fp32 scale a tensor)
    copies: int = 0  # quantized weight copies a layer caches in a step window
    attention_bmm: list[str] = field(default_factory=list)  # attention modules with MX BMMs

    @property
    def weight_cache_bytes(self) -> int:
        """The most the converted layers' weight caches hold at once, inside a step window:
        per layer, its cached FP8 copies (1 byte per weight) plus their E8M0 scales (1 byte
        per block of ``block_size``); nothing outside a window."""
        return sum(d.cache_bytes for d in self.decisions if d.converted)

    @property
    def layer_recipes(self) -> dict[str, str]:
        """fqn -> the recipe each linear runs ("high precision" when kept)."""
        return {d.name: d.recipe if d.converted else "high precision" for d in self.decisions}

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
            own = d.recipe if d.converted else "high precision"
            lines.append(f"  {tag} {d.name:<{width}}  {shape:>12}  {own:<17} {d.reason}")
        if self.attention_bmm:
            lines.append(f"  attention BMMs (QK^T, PV) in MX: {', '.join(self.attention_bmm)}")
        return "\n".join(lines)


def _cache_bytes(r: Recipe, n_in: int, n_out: int) -> int:
    """The most a layer's weight cache holds inside a step window, under ``r``."""
    n = n_in * n_out
    if r.scaling is ScalingKind.MX:
        if r.weight_block is WeightBlock.TILE:  # one codes tensor, scales in two layouts
            return n + 2 * (n // r.block_size)
        copies = 2 - ("dgrad" in r.hp_gemms) - ("fprop" in r.hp_gemms)
        return copies * (n + n // r.block_size)
    if r.scaling is ScalingKind.ROWWISE:  # along K and along N, one fp32 scale a row
        return 2 * n + 4 * (n_in + n_out)
    return n + 4  # per tensor: one copy, one fp32 scale


_BLOCK = re.compile(r"^layers\.(\d+)\.")


def layer_recipe(recipe: Recipe, name: str, n_blocks: int) -> tuple[Recipe, str]:
    """The recipe of the linear ``name`` (and why), after the per-layer fields:
    ``keep_first_blocks`` / ``keep_last_blocks`` (blocks are ``layers.<i>``, ``n_blocks`` of
    them), then the first matching ``overrides`` entry, else ``recipe`` itself. An override
    preset keeps the run's conversion patterns, backend and saved-input choice."""
    m = _BLOCK.match(name)
    if m is not None:
        i = int(m.group(1))
        if i < recipe.keep_first_blocks:
            return _BF16, f"keep_first_blocks={recipe.keep_first_blocks}"
        if i >= n_blocks - recipe.keep_last_blocks:
            return _BF16, f"keep_last_blocks={recipe.keep_last_blocks}"
    for o in recipe.overrides:
        if fnmatch.fnmatchcase(name, o.pattern):
            over = named_recipe(o.recipe, convert=recipe.convert,
                                keep_high_precision=recipe.keep_high_precision)  # fmt: skip
            if over.quantized:
                over = over.replace(backend=recipe.backend, saved_input=recipe.saved_input)
            return over, f"override {o.pattern!r} -> {o.recipe}"
    return recipe, ""


def _decide(name: str, mod: nn.Linear, recipe: Recipe, n_blocks: int) -> tuple[bool, str, Recipe]:
    for pat in recipe.keep_high_precision:
        if fnmatch.fnmatchcase(name, pat):
            return False, f"matches keep_high_precision pattern {pat!r}", recipe
    hit = next((p for p in recipe.convert if fnmatch.fnmatchcase(name, p)), None)
    if hit is None:
        return False, f"matches no convert pattern {list(recipe.convert)}", recipe
    own, why = layer_recipe(recipe, name, n_blocks)
    if not own.quantized:
        return False, why or f"recipe {own.name} does not quantize", own
    if own.scaling is ScalingKind.MX:
        for dim_name in ("in_features", "out_features"):
            size = getattr(mod, dim_name)
            if size % own.block_size:
                return False, (
                    f"{dim_name}={size} is not a multiple of block_size {own.block_size}"
                ), own  # fmt: skip
    return True, why or f"matches convert pattern {hit!r}", own


def count_blocks(model: nn.Module) -> int:
    """The transformer blocks of ``model``: distinct ``layers.<i>`` prefixes of its linears."""
    ids = {int(m.group(1)) for n, mod in model.named_modules()
           if isinstance(mod, nn.Linear) and (m := _BLOCK.match(n))}  # fmt: skip
    return max(ids) + 1 if ids else 0


def plan_conversion(model: nn.Module, recipe: Recipe) -> ConversionReport:
    """Which ``nn.Linear`` modules of ``model`` :func:`convert_model` swaps, to which recipe
    (per-layer fields included), and why each other one stays; changes nothing."""
    mx = recipe.scaling is ScalingKind.MX
    report = ConversionReport(
        recipe.name,
        block_size=recipe.block_size if mx else 0,
        copies=2 if mx or recipe.scaling is ScalingKind.ROWWISE else 1,  # rowwise: along K, N
    )
    n_blocks = count_blocks(model)
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if not recipe.quantizes_any:
            convert, reason, own = False, f"recipe {recipe.name} does not quantize", recipe
        elif name:
            convert, reason, own = _decide(name, mod, recipe, n_blocks)
        else:  # in place means through the parent; the root has none
            convert, reason, own = False, "the root module cannot be swapped in place", recipe
        size = _cache_bytes(own, mod.in_features, mod.out_features) if convert else 0
        report.decisions.append(
            ModuleDecision(
                name,
                mod.in_features,
                mod.out_features,
                convert,
                reason,
                own.name if convert else "",
                size,
            )  # fmt: skip
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
    Attention modules that support it get MX QK^T and P·V when the recipe sets
    ``quantize_attention_bmm`` (:func:`_attach_attention_bmm`).
    The report is at ``model.mxfp8_report``. ``compile_quantize`` runs the MX fake-quantize
    through torch.compile (fast on CPU once compiled; see MXLinear); ``quantize_kernel``
    names the kernel instead (:mod:`mxfp8.numerics.backends`; None: by device).
    """
    report = plan_conversion(model, recipe)
    n_blocks = count_blocks(model)
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
            own = layer_recipe(recipe, name, n_blocks)[0]
            new = MXLinear.from_linear(mod, own, name=name, compile_quantize=compile_quantize,
                                       quantize_kernel=quantize_kernel)  # fmt: skip
        else:
            continue
        _set_submodule(model, name, new)
    report.attention_bmm = _attach_attention_bmm(model, recipe, n_blocks)
    model.mxfp8_report = report  # type: ignore[assignment]
    log.info("%s", report)
    return model


def _attach_attention_bmm(model: nn.Module, recipe: Recipe, n_blocks: int) -> list[str]:
    """Modules whose class declares ``supports_quantized_bmm`` (the model's attention; layers
    cannot import it) get ``name`` and ``bmm_recipe``: when the recipe sets
    ``quantize_attention_bmm``, the module's own recipe (:func:`layer_recipe`: a block kept in
    bf16 keeps its attention BMMs in high precision too) if it is MX, else None
    (:mod:`mxfp8.layers.attention_bmm`). Returns the names of the MX ones."""
    names = []
    for name, mod in model.named_modules():
        if getattr(type(mod), "supports_quantized_bmm", False):
            own = layer_recipe(recipe, name, n_blocks)[0] if recipe.quantize_attention_bmm else None
            on = own is not None and own.scaling is ScalingKind.MX
            mod.bmm_recipe = own.replace(quantize_attention_bmm=True) if on else None
            mod.name = name
            names += [name] if on else []
    return names


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def layer_recipes(model: nn.Module) -> dict[str, str]:
    """fqn -> the recipe each linear layer runs now ("high precision" for plain linears and
    layers switched off), adaptive switches included."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            quantized = isinstance(mod, MXLinear) and mod.recipe.quantized
            out[name] = mod.recipe.name if quantized else "high precision"
    return out


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
