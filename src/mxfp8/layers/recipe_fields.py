"""The vocabulary of a :class:`mxfp8.layers.recipe.Recipe`: its enum fields, the GEMMs and
their operands, and the default conversion patterns (re-exported by ``recipe``)."""

from __future__ import annotations

import enum
from typing import Any


class ScalingKind(enum.StrEnum):
    """How a tensor's scale is chosen.

    - ``none``: no quantization; the GEMMs run in the layer's high precision.
    - ``mx``: one E8M0 (power-of-two) scale per block of ``block_size`` consecutive elements
      along the GEMM's reduction dimension (OCP MX).
    - ``tensorwise``: one fp32 scale per tensor, ``dest_max / amax(tensor)`` (current scaling).
    - ``delayed``: one fp32 scale per tensor, ``dest_max / amax_history_reduced`` from earlier
      steps (cheap on GPUs; a sudden outlier saturates until the history catches up).
    - ``rowwise``: one fp32 scale per row of each operand along its GEMM's reduction dim,
      ``dest_max / amax(row)`` (current scaling per channel, torchao's ``rowwise``).
    """

    NONE = "none"
    MX = "mx"
    TENSORWISE = "tensorwise"
    DELAYED = "delayed"
    ROWWISE = "rowwise"

    @property
    def per_tensor(self) -> bool:
        return self in (ScalingKind.TENSORWISE, ScalingKind.DELAYED)


class Fp8Format(enum.StrEnum):
    """FP8 element format of an operand: E4M3 (more mantissa, max 448) or E5M2 (max 57344)."""

    E4M3 = "e4m3"
    E5M2 = "e5m2"

    def elem(self) -> Any:
        """The numerics core's ``ElemFormat`` object (imported lazily)."""
        from mxfp8.numerics import formats

        return formats.E4M3 if self is Fp8Format.E4M3 else formats.E5M2


class ScaleRuleName(enum.StrEnum):
    """MX scale-exponent rule (mirrors ``mxfp8.ScaleRule``; the strings are the same).

    - ``rceil`` (the paper): e = ceil(log2(amax / dest_max)); amax lands in (max/2, max].
    - ``floor`` (OCP v1.0): e = floor(log2(amax)) - emax_elem; amax mantissa > 1.75 saturates.
    """

    RCEIL = "rceil"
    FLOOR = "floor"


class AmaxReduce(enum.StrEnum):
    """How delayed scaling reduces its amax history to one amax.

    - ``max``: the largest amax of the last ``history_len`` steps.
    - ``ema``: an exponential moving average, a <- decay * a + (1 - decay) * amax.
    """

    MAX = "max"
    EMA = "ema"


class SavedInput(enum.StrEnum):
    """What an MX layer keeps of its input x for the weight-gradient GEMM.

    - ``mx``: the wgrad operand itself, quantized in the forward (blocks along tokens, from
      the high-precision x): FP8 codes plus E8M0 scales, 8.25 bits per element.
    - ``bf16``: x cast to bf16 (16 bits per element, as ``nn.Linear`` under autocast); the
      wgrad operand is quantized from it in backward. Bit-identical to ``mx`` when x already
      is bf16; when x is fp32 (the inputs of q/k/v and w1/w3 in this project's model, which
      follow an fp32 RMSNorm) the operand is rounded twice, fp32 -> bf16 -> FP8.
    """

    MX = "mx"
    BF16 = "bf16"


class ComputeDtype(enum.StrEnum):
    """The precision the model computes in (the autocast dtype; master weights stay fp32).

    - ``bf16``: bf16 autocast, as every quantized recipe here is built and tested;
    - ``fp16``: fp16 autocast; its 5 exponent bits need dynamic loss scaling (derived);
    - ``fp32``: no autocast, everything in fp32 (the seed's most precise baseline).
    """

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.value]


class WeightBlock(enum.StrEnum):
    """The shape of the weight's MX blocks (MX recipes with block_size 32).

    - ``1x32``: blocks of 32 along each GEMM's reduction dim, as for every operand: W is
      quantized twice (along K for fprop, along N for dgrad), each copy from fp32;
    - ``32x32``: one E8M0 scale per 32x32 tile of W, so W and W^T quantize to the same values
      and one quantized copy serves fprop and dgrad (TransformerEngine's and torchao's 2-D
      weight blocks). A tile's scale follows its largest element, so small rows of a tile lose
      precision against 1x32.
    """

    ROW = "1x32"
    TILE = "32x32"


class Backend(enum.StrEnum):
    """Which GEMM backend runs quantized matmuls (see :mod:`mxfp8.layers.gemm`).

    - ``auto``: ``scaled_mm`` on SM100+ GPUs for MX recipes, else ``emulated``.
    - ``emulated``: dequantize to bf16, matmul with fp32 accumulation (exact up to order).
    - ``scaled_mm``: ``torch._scaled_mm`` with hardware block scales (SM100+ only).
    """

    AUTO = "auto"
    EMULATED = "emulated"
    SCALED_MM = "scaled_mm"


GEMMS = ("fprop", "dgrad", "wgrad")
# gemm -> its two quantized operands, in (left, right) order of the product
GEMM_OPERANDS: dict[str, tuple[str, str]] = {
    "fprop": ("input", "weight"),  # y = x W^T
    "dgrad": ("grad_output", "weight"),  # dx = dy W
    "wgrad": ("grad_output", "input"),  # dW = dy^T x
}

# what the default recipe keeps in high precision: embeddings and the LM head (by fqn)
DEFAULT_CONVERT = ("layers.*",)
DEFAULT_KEEP = ("tok_embeddings", "output", "lm_head", "*.lm_head")


def _enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"recipe field {name}={value!r} is invalid; allowed: {allowed}") from None


def check_weight_block(r: Any) -> None:
    """What 32x32 weight tiles need of a recipe ``r``: MX blocks of 32, the emulated backend,
    and one weight format. The tiles are quantized once and that copy serves both fprop and
    dgrad (``mxfp8.layers.mx_function._tiled_weight``), so the two GEMMs' weight formats must
    agree (the scale rule is the recipe's, one for every operand); raises ValueError."""
    if r.weight_block is not WeightBlock.TILE:
        return
    if r.scaling is not ScalingKind.MX or r.block_size != 32:
        raise ValueError("weight_block '32x32' is for MX recipes with block_size 32")
    if r.backend is Backend.SCALED_MM:
        raise ValueError(
            "weight_block '32x32' runs on the emulated backend (scaled_mm "
            "with 2-D weight blocks is not written yet); use backend 'auto'"
        )
    if r.fprop_weight != r.dgrad_weight:
        raise ValueError(
            "weight_block '32x32' quantizes W once, in one format, for both fprop and dgrad, "
            f"so fprop_weight and dgrad_weight must be equal (got {r.fprop_weight.value} and "
            f"{r.dgrad_weight.value}); set both to one format, or use weight_block '1x32' "
            "(one copy of W per GEMM, each in its own format)"
        )
