"""Quantized attention BMMs (``Recipe.quantize_attention_bmm``): QK^T and P·V in MX.

One autograd Function, :class:`MXBmmFunction`, computes a batched matmul c = a @ b with
a [..., M, K] and b [..., K, N]. Each of its three products quantizes its two operands along
that product's reduction dim, each from the high-precision tensor (never by re-quantizing a
quantized copy), exactly as :mod:`mxfp8.layers.mx_function` does for a linear layer (a plays
x, b plays W^T). The recipe's formats, block size and scale rule apply:

| GEMM  | product       | reduced | operands: name (recipe format field)                   |
|-------|---------------|---------|--------------------------------------------------------|
| fprop | c  = a @ b    | K       | a input (fprop_input), b weight (fprop_weight)         |
| dgrad | da = dc @ b^T | N       | dc grad_output (dgrad_grad_output), b weight (dgrad_weight) |
| wgrad | db = a^T @ dc | M       | dc grad_output (wgrad_grad_output), a input (wgrad_input) |

Both operands of a GEMM have their blocks along its reduced dim.

:func:`mx_attention` builds attention from two of them: ``qk`` (a = q [B, H, T, D],
b = k^T [B, H, D, S]: q and k along D forward; dq = ds @ k with ds along S, k along S;
dk^T = q^T @ ds with q and ds along T) and ``pv`` (a = p [B, H, T, S], b = v [B, H, S, D]:
p and v along S forward; dp = do @ v^T with do and v along D; dv = p^T @ do with p and do
along T). So q and p take the input formats, k and v the weight formats, ds and do the
grad_output formats. Scores are scaled (1/sqrt(D) by default) after the product, masked
(causal, aligned to the last key: query i of T sees keys 0 .. S - T + i, which is the KV-cache
case too), and softmax runs in fp32. Grouped-query attention repeats each K/V head for its
n_heads / n_kv_heads query heads (as SDPA's ``enable_gqa``); their gradients sum in fp32.

Observer and telemetry: with ``module.observer`` set, each quantized operand is reported as
``observer(module, gemm, operand, hp, q)``: gemm ``qk``, ``qk_dgrad``, ``qk_wgrad``, ``pv``,
``pv_dgrad`` or ``pv_wgrad``; operand ``input``, ``weight`` or ``grad_output`` as in the
table; ``hp`` the fp32 tensor quantized and ``q`` its MXTensor (blocks along ``q.dim``).
Forward operands are not reported in a recomputed forward (activation checkpointing).

Emulation: every operand is dequantized to fp32 and multiplied in fp32 (the products of two
FP8 x E8M0 values are exact in fp32, so this is MX hardware up to the order of accumulation).
A reduction dim that is not a multiple of the block size (a sequence length, the keys of a
KV cache) zero-pads its last block, as :func:`mxfp8.quantize` does with ``pad=True``. The
operands use the eager quantize kernel; the inputs of the Function are saved in high
precision and their backward copies are quantized in backward.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from mxfp8.layers.gemm import MXSpec
from mxfp8.layers.recipe import GEMM_OPERANDS, Recipe, ScalingKind
from mxfp8.layers.recompute import is_recomputing
from mxfp8.numerics.quantize import dequantize, fake_quantize, quantize

__all__ = ["BMM_GEMMS", "MXBmmFunction", "bmm_specs", "causal_mask", "mx_attention", "mx_bmm"]

# the observer's gemm names, per product
BMM_GEMMS = tuple(f"{p}{s}" for p in ("qk", "pv") for s in ("", "_dgrad", "_wgrad"))
OPERANDS_PER_MODULE = 12  # 2 products x 3 GEMMs x 2 operands


@functools.lru_cache(maxsize=64)
def bmm_specs(recipe: Recipe) -> dict[tuple[str, str], MXSpec]:
    """(gemm, operand) -> MXSpec, gemm in fprop/dgrad/wgrad, from an MX recipe's fields."""
    if recipe.scaling is not ScalingKind.MX:
        raise ValueError(f"quantized attention BMMs need an MX recipe, got {recipe.scaling.value}")
    return {
        (g, o): MXSpec(recipe.fmt(g, o).elem(), recipe.block_size, recipe.scale_rule.value)
        for g, ops in GEMM_OPERANDS.items()
        for o in ops
    }


def _gemm_name(product: str, gemm: str) -> str:
    return product if gemm == "fprop" else f"{product}_{gemm}"


def _operand(x: torch.Tensor, spec: MXSpec, dim: int, want_q: bool):
    """(x on the MX grid in fp32, its MXTensor or None): blocks along ``dim``, from x."""
    x = x.float()
    kw = dict(block_size=spec.block_size, dim=dim, scale_rule=spec.scale_rule, pad=True)
    if not want_q:
        return fake_quantize(x, spec.fmt, **kw), None  # bit-equal to quantize + dequantize
    q = quantize(x, spec.fmt, **kw)
    return dequantize(q, torch.float32), q


class MXBmmFunction(torch.autograd.Function):
    """forward(a [..., M, K], b [..., K, N], specs, product, module) -> c [..., M, N], fp32.

    ``specs``: :func:`bmm_specs`; ``product``: the observer's gemm prefix ("qk", "pv");
    ``module``: what carries ``observer`` (or None). Gradients come back in a's and b's
    dtypes."""

    @staticmethod
    def forward(ctx, a, b, specs, product, module):  # type: ignore[override]
        obs = None if module is None or is_recomputing() else module.observer
        with torch.autocast(a.device.type, enabled=False):
            aq, qa = _operand(a, specs["fprop", "input"], -1, obs is not None)  # along K
            bq, qb = _operand(b, specs["fprop", "weight"], -2, obs is not None)  # along K
            c = torch.matmul(aq, bq)
        if obs is not None:
            obs(module, product, "input", a.float(), qa)
            obs(module, product, "weight", b.float(), qb)
        ctx.save_for_backward(a, b)
        ctx.specs, ctx.product, ctx.module = specs, product, module
        return c

    @staticmethod
    def backward(ctx, dc):  # type: ignore[override]
        a, b = ctx.saved_tensors
        specs, module = ctx.specs, ctx.module
        obs = None if module is None else module.observer
        want = obs is not None
        da = db = None
        dc = dc.float()
        with torch.autocast(dc.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # da = dc @ b^T: dc and b along N
                dcq, qdc = _operand(dc, specs["dgrad", "grad_output"], -1, want)
                btq, qbt = _operand(b, specs["dgrad", "weight"], -1, want)
                da = torch.matmul(dcq, btq.transpose(-2, -1)).to(a.dtype)
                if obs is not None:
                    gemm = _gemm_name(ctx.product, "dgrad")
                    obs(module, gemm, "grad_output", dc, qdc)
                    obs(module, gemm, "weight", b.float(), qbt)
            if ctx.needs_input_grad[1]:  # db = a^T @ dc: a and dc along M
                atq, qat = _operand(a, specs["wgrad", "input"], -2, want)
                dctq, qdct = _operand(dc, specs["wgrad", "grad_output"], -2, want)
                db = torch.matmul(atq.transpose(-2, -1), dctq).to(b.dtype)
                if obs is not None:
                    gemm = _gemm_name(ctx.product, "wgrad")
                    obs(module, gemm, "grad_output", dc, qdct)
                    obs(module, gemm, "input", a.float(), qat)
        return da, db, None, None, None


def mx_bmm(a: torch.Tensor, b: torch.Tensor, specs: dict, product: str = "bmm",
           module: Any = None) -> torch.Tensor:  # fmt: skip
    """c = a @ b (fp32) with MX operands along each product's reduction dim (module doc)."""
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"mx_bmm needs a [..., M, K] and b [..., K, N], got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")  # fmt: skip
    return MXBmmFunction.apply(a, b, specs, product, module)


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """[T, S] bool, True where query i (position S - T + i) may see key j (j <= S - T + i)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def mx_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    specs: dict,
    *,
    causal: bool = True,
    scale: float | None = None,
    module: Any = None,
) -> torch.Tensor:
    """Attention with MX QK^T and P·V: q [B, H, T, D], k and v [B, Hkv, S, D] -> [B, H, T, D]
    in q's dtype. softmax((q k^T) * scale, masked) in fp32, then P·V (module docstring)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if H % Hkv or v.shape[1] != Hkv or v.shape[2] != S:
        raise ValueError(f"attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}: n_heads must be a multiple of n_kv_heads")  # fmt: skip
    if causal and S < T:
        raise ValueError(f"causal attention needs at least as many keys ({S}) as queries ({T})")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = q.float(), k.float(), v.float()
        if Hkv != H:  # each K/V head serves H // Hkv query heads, as SDPA's enable_gqa
            kf = kf.repeat_interleave(H // Hkv, dim=1)
            vf = vf.repeat_interleave(H // Hkv, dim=1)
        s = mx_bmm(qf, kf.transpose(-2, -1), specs, "qk", module) * scale  # [B, H, T, S]
        if causal:
            s = s.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
        p = torch.softmax(s, dim=-1)
        out = mx_bmm(p, vf, specs, "pv", module)  # [B, H, T, D]
    return out.to(q.dtype)
