"""The named recipes, as the fields each sets on :class:`mxfp8.layers.recipe.Recipe` (why these
presets: the module doc of :mod:`mxfp8.layers.recipe`); ``recipe(name)`` builds one."""

from __future__ import annotations

from typing import Any

from mxfp8.layers.recipe_fields import (
    AmaxReduce,
    ComputeDtype,
    Fp8Format,
    ScaleRuleName,
    ScalingKind,
    WeightBlock,
)

_E4, _E5 = Fp8Format.E4M3, Fp8Format.E5M2
_GRADS_E5M2 = {"dgrad_grad_output": _E5, "wgrad_grad_output": _E5}

PRESETS: dict[str, dict[str, Any]] = {
    "bf16": dict(scaling=ScalingKind.NONE, description="no quantization: the bf16 baseline"),
    "fp32": dict(
        scaling=ScalingKind.NONE,
        compute_dtype=ComputeDtype.FP32,
        description="no quantization, no autocast: everything in fp32",
    ),
    "fp16": dict(
        scaling=ScalingKind.NONE,
        compute_dtype=ComputeDtype.FP16,
        description="no quantization, fp16 autocast with dynamic loss scaling",
    ),
    "mxfp8": dict(
        scaling=ScalingKind.MX,
        description="the paper: MX blocks of 32, E4M3 everywhere, rceil scales",
    ),
    "mxfp8-floor": dict(
        scaling=ScalingKind.MX,
        scale_rule=ScaleRuleName.FLOOR,
        description="as mxfp8 with the OCP v1.0 floor scale rule (the paper's failing ablation)",
    ),
    "mxfp8-e5m2-grads": dict(
        scaling=ScalingKind.MX,
        **_GRADS_E5M2,
        description="as mxfp8 with output gradients in E5M2",
    ),
    "mxfp8-wgrad-hp": dict(
        scaling=ScalingKind.MX,
        hp_gemms=("wgrad",),
        description="as mxfp8 with the weight-gradient GEMM in bf16 (torchao's wgrad_with_hp)",
    ),
    "mxfp8-2d-weight": dict(
        scaling=ScalingKind.MX,
        weight_block=WeightBlock.TILE,
        description="as mxfp8 with 32x32 weight tiles: one weight copy for fprop and dgrad",
    ),
    "mxfp8-attn": dict(
        scaling=ScalingKind.MX,
        quantize_attention_bmm=True,
        description="as mxfp8 with the attention BMMs (QK^T, PV) in MX too; softmax in fp32",
    ),
    "mxfp8-adaptive": dict(
        scaling=ScalingKind.MX,
        adaptive=True,
        description="as mxfp8; a layer whose operands cross saturation/underflow/SQNR "
        "thresholds, or that a loss spike names, switches to bf16 for the rest of the run",
    ),
    "fp8-tensorwise": dict(
        scaling=ScalingKind.TENSORWISE,
        **_GRADS_E5M2,
        description="per-tensor current scaling; E4M3 forward, E5M2 gradients",
    ),
    "fp8-rowwise": dict(
        scaling=ScalingKind.ROWWISE,
        description="per-row current scaling along each GEMM's reduction dim, E4M3 everywhere",
    ),
    "fp8-rowwise-gw-hp": dict(
        scaling=ScalingKind.ROWWISE,
        hp_gemms=("wgrad",),
        description="as fp8-rowwise with the weight-gradient GEMM in bf16 (unquantized dy, x)",
    ),
    "fp8-delayed": dict(
        scaling=ScalingKind.DELAYED,
        **_GRADS_E5M2,
        history_len=16,
        amax_reduce=AmaxReduce.MAX,
        description="per-tensor delayed scaling: max amax of the last 16 steps",
    ),
    "fp8-delayed-ema": dict(
        scaling=ScalingKind.DELAYED,
        **_GRADS_E5M2,
        history_len=16,
        amax_reduce=AmaxReduce.EMA,
        ema_decay=0.9,
        description="per-tensor delayed scaling: EMA of past amax (decay 0.9)",
    ),
}
