"""Training recipes: how each GEMM of a linear layer is quantized, as one validated object.

A :class:`Recipe` is frozen and checked when built, so a bad combination fails at start-up with
a message that lists what is allowed, not deep inside a kernel. Named presets come from
:func:`recipe`; :func:`list_recipes` lists them.

Why these presets (see the reference notes, sections 3-5):

- ``mxfp8`` is the paper's recipe: MX blocks of 32 along each GEMM's reduction dimension,
  E4M3 for inputs, weights *and* output gradients (block scales give the range, so the extra
  mantissa bit of E4M3 wins), and the round-up ("rceil") scale rule, so the largest element of a
  block never saturates.
- ``mxfp8-floor`` is the OCP v1.0 rule that the paper found to diverge at scale: a block whose
  amax mantissa is above 1.75 saturates its largest element.
- ``mxfp8-e5m2-grads`` keeps the Hopper-era habit of E5M2 gradients, as an ablation.
- ``fp8-tensorwise`` / ``fp8-delayed`` are the per-tensor FP8 recipes: one fp32 scale per
  tensor, from the tensor itself (current) or from an amax history (delayed). A single scale
  cannot cover the range of gradients, so these need dynamic loss scaling.
- ``fp8-rowwise`` is per-row current scaling (torchao's ``rowwise``): one fp32 scale per row
  of each operand along its GEMM's reduction dim, E4M3 everywhere; each row has its own range,
  so no loss scaling. ``fp8-rowwise-gw-hp`` runs its weight-gradient GEMM in high precision.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from mxfp8.layers.recipe_fields import (  # noqa: F401 - re-exported: the recipe API
    DEFAULT_CONVERT,
    DEFAULT_KEEP,
    GEMM_OPERANDS,
    GEMMS,
    AmaxReduce,
    Backend,
    ComputeDtype,
    Fp8Format,
    SavedInput,
    ScaleRuleName,
    ScalingKind,
    WeightBlock,
    _enum,
    check_weight_block,
)
from mxfp8.layers.recipe_presets import PRESETS


@dataclass(frozen=True)
class LayerOverride:
    """A per-layer recipe: linear layers whose fqn matches ``pattern`` (fnmatch) use the
    preset ``recipe`` instead (``bf16``: kept in high precision)."""

    pattern: str
    recipe: str

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"recipe override: pattern must be a non-empty fnmatch pattern, "
                             f"got {self.pattern!r}")  # fmt: skip
        if self.recipe not in PRESETS:
            raise ValueError(f"recipe override {self.pattern!r}: unknown recipe "
                             f"{self.recipe!r}; presets: {', '.join(PRESETS)}")  # fmt: skip
        r = PRESETS[self.recipe]
        if r.get("compute_dtype", ComputeDtype.BF16) is not ComputeDtype.BF16:
            raise ValueError(f"recipe override {self.pattern!r}: {self.recipe!r} changes the "
                             "compute dtype, which is the model's, not a layer's; use 'bf16' "
                             "to keep layers in high precision")  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """How the three GEMMs of every converted linear layer are quantized.

    Format fields name the element format of each operand of each GEMM (``fprop``: y = x W^T,
    ``dgrad``: dx = dy W, ``wgrad``: dW = dy^T x). Enum fields also accept their strings.
    """

    name: str = "custom"
    """Preset name, or 'custom'. Only informational."""
    scaling: ScalingKind = ScalingKind.MX
    """Scaling kind: none, mx, tensorwise, delayed or rowwise."""
    fprop_input: Fp8Format = Fp8Format.E4M3
    """Format of x in the forward GEMM."""
    fprop_weight: Fp8Format = Fp8Format.E4M3
    """Format of W in the forward GEMM."""
    dgrad_grad_output: Fp8Format = Fp8Format.E4M3
    """Format of dy in the input-gradient GEMM."""
    dgrad_weight: Fp8Format = Fp8Format.E4M3
    """Format of W in the input-gradient GEMM."""
    wgrad_grad_output: Fp8Format = Fp8Format.E4M3
    """Format of dy in the weight-gradient GEMM."""
    wgrad_input: Fp8Format = Fp8Format.E4M3
    """Format of x in the weight-gradient GEMM."""
    block_size: int = 32
    """MX block size (elements sharing one E8M0 scale along the reduction dim). MX only."""
    scale_rule: ScaleRuleName = ScaleRuleName.RCEIL
    """MX scale rule: rceil (the paper) or floor (OCP v1.0). MX only."""
    history_len: int = 16
    """Delayed scaling: number of past amax values kept."""
    amax_reduce: AmaxReduce = AmaxReduce.MAX
    """Delayed scaling: reduce the history by max or by an exponential moving average."""
    ema_decay: float = 0.9
    """Delayed scaling with ema: weight of the old average, in (0, 1)."""
    convert: tuple[str, ...] = DEFAULT_CONVERT
    """fnmatch patterns of nn.Linear fqns eligible for conversion (default: transformer blocks)."""
    keep_high_precision: tuple[str, ...] = DEFAULT_KEEP
    """fnmatch patterns of fqns always kept in high precision (embeddings, LM head)."""
    quantize_attention_bmm: bool = False
    """Whether the attention BMMs (QK^T, PV) are MX-quantized too, forward and backward, with
    softmax in fp32 (layers/attention_bmm.py). The paper keeps them in bf16. MX only."""
    dynamic_loss_scaling: bool | None = None
    """Whether training needs a dynamic loss scaler. None = derived: True for per-tensor FP8."""
    backend: Backend = Backend.AUTO
    """GEMM backend: auto, emulated or scaled_mm."""
    saved_input: SavedInput = SavedInput.MX
    """What MX layers keep of x for backward: mx (the quantized wgrad operand, 8.25 bits per
    element) or bf16 (x in bf16, quantized in backward). MX only."""
    compute_dtype: ComputeDtype = ComputeDtype.BF16
    """Autocast precision of the model: bf16, fp16 (unquantized recipes only) or fp32 (no
    autocast)."""
    hp_gemms: tuple[str, ...] = ()
    """GEMMs computed in high precision (the compute dtype) from unquantized operands, e.g.
    ("wgrad",): torchao's wgrad_with_hp. MX and rowwise recipes only."""
    weight_block: WeightBlock = WeightBlock.ROW
    """Shape of the weight's MX blocks: 1x32, or 32x32 tiles (one copy for fprop and dgrad)."""
    overrides: tuple[LayerOverride, ...] = ()
    """Per-layer recipes by fqn pattern (the first matching override wins), e.g.
    [[recipe.overrides]] pattern = "layers.0.*", recipe = "bf16"."""
    keep_first_blocks: int = 0
    """Keep the linears of the first N transformer blocks (``layers.<i>``) in bf16."""
    keep_last_blocks: int = 0
    """Keep the linears of the last N transformer blocks in bf16 (the NVFP4 guide keeps the
    last ~15 %; Megatron's --first-last-layers-bf16)."""
    adaptive: bool = False
    """Switch a layer to bf16 for the rest of the run when its quantized operands cross the
    thresholds below at a telemetry step, or when the divergence detector names it."""
    adaptive_max_saturated_pct: float = 0.5
    """Adaptive: the most % of saturated elements an operand may have."""
    adaptive_max_underflow_pct: float = 5.0
    """Adaptive: the most % of nonzero elements an operand may flush to zero."""
    adaptive_underflow_ignore: tuple[str, ...] = ("wgrad/grad_output",)
    """Adaptive: operands ("gemm/operand") whose underflow is not checked. By default the
    weight-gradient GEMM's output gradient, blocked along tokens: healthy runs flush up to 39 %
    of it at 30.3 dB SQNR or more, while every other operand stays under 0.3 % (docs/recipes.md)."""
    adaptive_min_sqnr_db: float = 20.0
    """Adaptive: the least SQNR (dB) an operand may have."""
    adaptive_on_divergence: bool = True
    """Adaptive: also switch the layers a divergence event names first."""
    adaptive_every: int = 25
    """Adaptive: check every N steps (the telemetry interval, when run.telemetry_every is 0)."""
    description: str = field(default="", compare=False)
    """One line for `mxfp8 recipes`."""

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # frozen: normalize once, here

        put("scaling", _enum(ScalingKind, self.scaling, "scaling"))
        for f in FORMAT_FIELDS:
            put(f, _enum(Fp8Format, getattr(self, f), f))
        put("scale_rule", _enum(ScaleRuleName, self.scale_rule, "scale_rule"))
        put("amax_reduce", _enum(AmaxReduce, self.amax_reduce, "amax_reduce"))
        put("backend", _enum(Backend, self.backend, "backend"))
        put("saved_input", _enum(SavedInput, self.saved_input, "saved_input"))
        put("compute_dtype", _enum(ComputeDtype, self.compute_dtype, "compute_dtype"))
        put("weight_block", _enum(WeightBlock, self.weight_block, "weight_block"))
        if isinstance(self.hp_gemms, str):
            raise ValueError(f"recipe field hp_gemms must be a list of GEMM names, "
                             f"got {self.hp_gemms!r}")  # fmt: skip
        put("hp_gemms", tuple(self.hp_gemms))
        ignore = self.adaptive_underflow_ignore
        if isinstance(ignore, str) or not all(
            isinstance(w, str) and w.count("/") == 1 and all(w.split("/")) for w in ignore
        ):
            raise ValueError(f"recipe field adaptive_underflow_ignore must be a list of "
                             f"'gemm/operand' names, got {ignore!r}")  # fmt: skip
        put("adaptive_underflow_ignore", tuple(ignore))
        over = []
        for o in self.overrides:
            if isinstance(o, dict):
                unknown = sorted(set(o) - {"pattern", "recipe"})
                if unknown or set(o) != {"pattern", "recipe"}:
                    raise ValueError(f"recipe override {o!r}: needs exactly 'pattern' and "
                                     "'recipe'")  # fmt: skip
                o = LayerOverride(**o)
            elif not isinstance(o, LayerOverride):
                raise ValueError(f"recipe overrides must be tables of pattern and recipe, "
                                 f"got {o!r}")  # fmt: skip
            over.append(o)
        put("overrides", tuple(over))
        for name in ("convert", "keep_high_precision"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"recipe field {name} must be a list of fnmatch patterns")
            put(name, tuple(value))
        if self.dynamic_loss_scaling is None:
            fp16 = self.compute_dtype is ComputeDtype.FP16
            per_tensor = any(recipe(o.recipe).dynamic_loss_scaling for o in self.overrides)
            put("dynamic_loss_scaling", self.scaling.per_tensor or fp16 or per_tensor)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool):
            raise ValueError(f"block_size must be an int, got {self.block_size!r}")
        if self.scaling is ScalingKind.MX and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 for MX scaling, got {self.block_size}")
        if not isinstance(self.history_len, int) or self.history_len < 1:
            raise ValueError(f"history_len must be an int >= 1, got {self.history_len!r}")
        if not 0.0 < float(self.ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if self.scaling.per_tensor:
            # one quantized copy per tensor feeds both GEMMs that use it (transposing a
            # per-tensor-scaled tensor is exact), so its format must agree across them
            for a, b in (
                ("fprop_input", "wgrad_input"),
                ("fprop_weight", "dgrad_weight"),
                ("dgrad_grad_output", "wgrad_grad_output"),
            ):
                if getattr(self, a) != getattr(self, b):
                    raise ValueError(
                        f"{self.scaling.value} scaling quantizes each tensor once for both GEMMs "
                        f"that use it, so {a} and {b} must be equal "
                        f"(got {getattr(self, a).value} and {getattr(self, b).value})"
                    )
        if self.backend is Backend.SCALED_MM and self.scaling is not ScalingKind.MX:
            raise ValueError(
                "backend 'scaled_mm' is for MX recipes; allowed for "
                f"{self.scaling.value} scaling: 'auto', 'emulated'"
            )
        if self.backend is Backend.SCALED_MM and self.block_size != 32:
            raise ValueError(
                f"backend 'scaled_mm' needs block_size 32 (hardware MX), got {self.block_size}"
            )
        bad = [g for g in self.hp_gemms if g not in GEMMS]
        if bad or len(set(self.hp_gemms)) != len(self.hp_gemms):
            raise ValueError(f"recipe field hp_gemms={list(self.hp_gemms)!r}: each of "
                             f"{', '.join(GEMMS)} at most once")  # fmt: skip
        if self.hp_gemms and self.scaling not in (ScalingKind.MX, ScalingKind.ROWWISE):
            raise ValueError(f"hp_gemms is for MX and rowwise recipes, not "
                             f"{self.scaling.value} scaling")  # fmt: skip
        check_weight_block(self)
        for name in ("keep_first_blocks", "keep_last_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"recipe field {name} must be an int >= 0, got {v!r}")
        if not isinstance(self.adaptive_every, int) or self.adaptive_every < 1:
            raise ValueError(f"adaptive_every must be an int >= 1, got {self.adaptive_every!r}")
        if self.adaptive and self.scaling is not ScalingKind.MX:
            raise ValueError("adaptive is for MX recipes (it reads their operand telemetry)")
        for name, lo, hi in (("adaptive_max_saturated_pct", 0, 100),
                             ("adaptive_max_underflow_pct", 0, 100),
                             ("adaptive_min_sqnr_db", -1000, 1000)):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise ValueError(f"recipe field {name} must be a number in [{lo}, {hi}], "
                                 f"got {v!r}")  # fmt: skip
        if self.compute_dtype is ComputeDtype.FP16 and self.quantized:
            raise ValueError(
                "compute_dtype 'fp16' is for the unquantized baseline (scaling 'none'): the "
                "quantized layers are built for bf16 or fp32 outputs"
            )
        if not isinstance(self.quantize_attention_bmm, bool):
            raise ValueError(f"recipe field quantize_attention_bmm must be true or false, "
                             f"got {self.quantize_attention_bmm!r}")  # fmt: skip
        if self.quantize_attention_bmm and self.scaling is not ScalingKind.MX:
            # QK^T and PV are MX-quantized (layers/attention_bmm.py) with the recipe's formats
            raise ValueError(
                f"quantize_attention_bmm=True is for MX recipes (scaling 'mx'), not "
                f"{self.scaling.value} scaling: the attention BMMs are quantized with MX blocks "
                "and the recipe's formats; leave it false or use an MX recipe"
            )

    # --- access -------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.scaling is not ScalingKind.NONE

    @property
    def quantizes_any(self) -> bool:
        """Whether some layer quantizes: this recipe, or one of its per-layer overrides."""
        return self.quantized or any(recipe(o.recipe).quantized for o in self.overrides)

    def autocast(self, device_type: str) -> Any:
        """The autocast context the model runs its forward in under this recipe (disabled
        for ``compute_dtype = fp32``)."""
        import torch

        on = self.compute_dtype is not ComputeDtype.FP32
        return torch.autocast(device_type, dtype=self.compute_dtype.torch_dtype, enabled=on)

    def fmt(self, gemm: str, operand: str) -> Fp8Format:
        """The element format of ``operand`` in ``gemm`` (see GEMM_OPERANDS)."""
        if operand not in GEMM_OPERANDS.get(gemm, ()):
            raise KeyError(f"no operand {operand!r} in GEMM {gemm!r}; see GEMM_OPERANDS")
        return getattr(self, f"{gemm}_{operand}")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again)."""
        derives = {"scaling", "compute_dtype"}
        if "dynamic_loss_scaling" not in changes and derives & set(changes):
            changes["dynamic_loss_scaling"] = None  # re-derive from the new scaling kind
        return dataclasses.replace(self, **changes)

    # --- serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of strings, numbers, bools and lists (JSON/TOML friendly)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = [dataclasses.asdict(v) if isinstance(v, LayerOverride) else v
                         for v in value]  # fmt: skip
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; unknown keys are an error (typos must not pass)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)

    def to_toml(self) -> str:
        # TOML has no null: a None field is left out and takes its default when read back
        return tomli_w.dumps({k: v for k, v in self.to_dict().items() if v is not None})

    @classmethod
    def from_toml(cls, text: str) -> Recipe:
        return cls.from_dict(tomllib.loads(text))


FORMAT_FIELDS = tuple(f"{g}_{o}" for g in GEMMS for o in GEMM_OPERANDS[g])


def list_recipes() -> list[str]:
    """Names of the preset recipes, in a stable order (baseline first)."""
    return list(PRESETS)


def recipe(name: str, **overrides: Any) -> Recipe:
    """The preset ``name``, optionally with some fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown recipe {name!r}; presets: {', '.join(PRESETS)}")
    return Recipe(name=name, **{**PRESETS[name], **overrides})
