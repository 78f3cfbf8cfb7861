"""The autograd Function of an MX linear layer: three GEMMs, six quantized operands.

y = x W^T with x [M, K] (M tokens), W [N, K]. Each GEMM's operands are quantized along that
GEMM's reduction dimension, each from the high-precision tensor (reference notes, section 4):

| GEMM  | product        | reduction | operands (NT form: a [.., R] @ b [.., R]^T, R reduced) |
|-------|----------------|-----------|--------------------------------------------------------|
| fprop | y  = x W^T     | K         | a = x [M, K],      b = W [N, K]                        |
| dgrad | dx = dy W      | N         | a = dy [M, N],     b = W^T [K, N] (W along its dim 0)  |
| wgrad | dW = dy^T x    | M         | a = dy^T [N, M],   b = x^T [K, M] (both along dim 0)   |

Why the column-wise copies come from high precision: an MX block is a run of 32 elements
along one axis with one shared scale; transposing a row-quantized tensor gives blocks along
the wrong axis, and re-quantizing it would round twice. So x, W and dy are each quantized
twice, once per axis, always from the original values.

What is kept, and in which form (the memory of an MX layer):

- the wgrad copy of x is made in the forward (while x is hot in cache) and saved for backward
  instead of x, as MX (FP8 codes plus E8M0 scales, 8.25 bits per element; the backend's
  ``store_mx``), and dequantized in backward (``load_mx``), bit-identical to keeping the
  dequantized copy. ``Recipe.saved_input = bf16`` saves bf16 x instead and quantizes the wgrad
  copy from it in backward;
- the weight's two copies are cached only inside a step window (:func:`weight_operand`,
  :mod:`mxfp8.layers.step`), stored as MX too and dequantized at each use; outside a window
  each call quantizes the weight fresh;
- operands that die within the call (the fprop copy of x, the two copies of dy) go to the
  shared scratch pool on CPU, and layers reading the same x (q/k/v, w1/w3) share its copies
  (:mod:`mxfp8.layers.scratch`);
- in a forward that needs no gradient (``no_grad``, inference, or frozen inputs and weights)
  neither the wgrad copy of x nor the dgrad copy of W is made.

Nothing but tensors goes through ``save_for_backward``: a saved operand's description is kept
on ``ctx`` without tensors, so ``saved_tensors_hooks`` (activation checkpointing, memory
accounting) see every saved byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mxfp8.layers.gemm import EmulatedBackend, MXSpec, ScaledMMBackend, StoredMX
from mxfp8.layers.recipe import SavedInput
from mxfp8.layers.scratch import POOL, SHARED


@dataclass(frozen=True, eq=False)
class MXPlan:
    """Everything one call needs, fixed per (layer, device, compute dtype)."""

    specs: dict[tuple[str, str], MXSpec]  # (gemm, operand) -> how to quantize it
    backend: EmulatedBackend | ScaledMMBackend
    compute_dtype: torch.dtype  # dtype of the GEMM outputs (bf16 under autocast)
    saved_input: SavedInput = SavedInput.MX
    hp_gemms: frozenset = frozenset()  # GEMMs run unquantized, in the compute dtype
    weight_tile: int = 0  # 32: W in 32x32 tiles, one copy for fprop and dgrad; 0: 1x32

    def hp(self, gemm: str) -> bool:
        return gemm in self.hp_gemms


def scratch(layer, role: str, like: torch.Tensor, dtype=None) -> torch.Tensor | None:
    """A pooled buffer shaped like ``like`` for an operand consumed within the call (see
    :mod:`mxfp8.layers.scratch`); None under torch.compile, off CPU, or when
    ``layer.reuse_buffers`` is False."""
    if layer is None or not layer.reuse_buffers:
        return None
    return POOL.get(role, like, dtype)


def _x_copies(x2d, plan: MXPlan, layer, want: bool, need_wgrad: bool):
    """(fprop operand of x, what is saved for wgrad, qx, qxt) of one forward; what is saved
    is None or (kind, value): "stored" (the backend's stored copy), "hp" (bf16 x) or
    "operand" (the GEMM operand itself, under a caller's torch.compile)."""
    be, dt = plan.backend, plan.compute_dtype
    spec, spec_t = plan.specs["fprop", "input"], plan.specs["wgrad", "input"]
    mode = plan.saved_input if need_wgrad else None
    if need_wgrad and plan.hp("wgrad"):
        mode = SavedInput.BF16  # kept in high precision, and never quantized for wgrad
    if plan.hp("fprop"):
        return _x_copies_hp_fprop(x2d, plan, want, mode)
    share = layer is not None and not want and layer.reuse_buffers
    extra = (spec, spec_t, dt, be.name, mode)
    if share:
        hit = SHARED.lookup(x2d, *extra)
        if hit is not None:
            return hit.operand, hit.stored, None, None
    x_buf = None if want else scratch(layer, "x", x2d, torch.bfloat16 if dt == torch.bfloat16
                                      else torch.float32)  # fmt: skip
    xq = stored = qx = qxt = None
    if mode is SavedInput.MX and torch.compiler.is_compiling():
        # inside a caller's torch.compile (whole-model compile, not recommended for MX
        # recipes) dynamo refuses saved views of traced intermediates: keep the wgrad
        # operand itself, dequantized, as before MX storage (more memory, same numbers)
        xq, _ = be.quantize_mx(x2d, spec, dt)
        return xq, ("operand", be.quantize_mx(x2d.t(), spec_t, dt)[0]), None, None
    if share or x_buf is not None:
        SHARED.clear()  # the pool's x buffer is about to be rewritten
    if mode is SavedInput.MX and not want:
        # both copies of x (along K now; x^T along tokens, kept) in shared passes
        both = be.quantize_and_store(x2d, spec, spec_t, dt, out_row=x_buf)
        if both is not None:
            xq, stored = both
    if xq is None:
        xq, qx = be.quantize_mx(x2d, spec, dt, want_q=want, out=x_buf)
        if mode is SavedInput.MX:  # x^T [K, M], blocks along M, from the high-precision x
            stored, qxt = be.store_mx(x2d.t(), spec_t, want_q=want)
    if mode is SavedInput.BF16:
        stored = _x_hp(x2d, plan)
        if want and not plan.hp("wgrad"):  # what backward will quantize, for the observer
            qxt = be.store_mx(stored.t(), spec_t, want_q=True)[1]
    saved = None if stored is None else ("hp" if mode is SavedInput.BF16 else "stored", stored)
    if share:
        SHARED.put(x2d, extra, xq, saved)
    return xq, saved, qx, qxt


def _x_hp(x2d: torch.Tensor, plan: MXPlan) -> torch.Tensor:
    """x kept in high precision for backward: bf16 (``saved_input = bf16``, or a
    high-precision wgrad under bf16 compute), else x itself (a high-precision wgrad in fp32
    compute runs in fp32, as ``nn.Linear`` does)."""
    if plan.hp("wgrad") and plan.compute_dtype != torch.bfloat16:
        return x2d
    return x2d if x2d.dtype == torch.bfloat16 else x2d.to(torch.bfloat16)


def _x_copies_hp_fprop(x2d, plan: MXPlan, want: bool, mode):
    """_x_copies when fprop is a high-precision GEMM: x itself is its operand."""
    be, spec_t = plan.backend, plan.specs["wgrad", "input"]
    saved = qxt = None
    if mode is SavedInput.BF16:
        saved = ("hp", _x_hp(x2d, plan))
    elif mode is SavedInput.MX:
        stored, qxt = be.store_mx(x2d.t(), spec_t, want_q=want)
        saved = ("stored", stored)
    return x2d.to(plan.compute_dtype), saved, None, qxt


class MXLinearFunction(torch.autograd.Function):
    """forward(x2d [M, K], weight [N, K], plan, layer) -> y [M, N] in plan.compute_dtype.

    ``layer`` (the MXLinear, or None under torch.compile) provides the weight-operand cache
    and the telemetry observer. Only used when a gradient is needed (see :func:`mx_forward`).
    """

    @staticmethod
    def forward(ctx, x2d, weight, plan: MXPlan, layer):  # type: ignore[override]
        be, dt = plan.backend, plan.compute_dtype
        obs = None if layer is None else layer.observing()
        want = obs is not None
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xq, stored, qx, qxt = _x_copies(x2d, plan, layer, want, need_wgrad)
        if plan.hp("fprop"):
            y = torch.mm(xq, weight.to(dt).t())
        else:
            pair = need_dgrad and not plan.hp("dgrad")
            wq, qw = weight_operand(layer, weight, plan, "fprop", pair=pair)
            y = be.mm_nt(xq, wq, dt)  # [M, N]
        if obs is not None:
            if not plan.hp("fprop"):
                obs(layer, "fprop", "input", x2d, qx)
                obs(layer, "fprop", "weight", weight, qw)
            if need_wgrad and not plan.hp("wgrad"):
                obs(layer, "wgrad", "input", x2d, qxt)
        kind, value = stored if stored is not None else (None, None)
        if kind is None:
            tensors, ctx.stored_meta = (), None
        elif isinstance(value, torch.Tensor):  # bf16 x, or an emulated operand
            tensors, ctx.stored_meta = (value,), kind
        else:
            tensors, ctx.stored_meta = be.pack(value)
        ctx.save_for_backward(weight, *tensors)
        ctx.plan, ctx.layer = plan, layer
        ctx.x_dtype = x2d.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        plan, layer = ctx.plan, ctx.layer
        be, dt = plan.backend, plan.compute_dtype
        weight, *tensors = ctx.saved_tensors
        obs = None if layer is None else layer.observer
        want = obs is not None
        dy = dy.reshape(-1, dy.shape[-1]).to(dt)  # [M, N]
        dx = dw = None
        spec, spec_t = plan.specs["dgrad", "grad_output"], plan.specs["wgrad", "grad_output"]
        pair = None
        dy_hp = plan.hp("dgrad") or plan.hp("wgrad")
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and not want and not dy_hp:
            # both copies of dy (along N for dgrad, dy^T along M for wgrad) in shared passes
            bufs = dict(out_row=scratch(layer, "dy", dy), out_col=scratch(layer, "dyT", dy))
            pair = be.quantize_pair(dy, spec, spec_t, dt, **bufs)
        if ctx.needs_input_grad[0] and plan.hp("dgrad"):
            dx = torch.mm(dy, weight.to(dt)).to(ctx.x_dtype)
        elif ctx.needs_input_grad[0]:
            if pair is not None:
                dyq, qdy = pair[0], None
            else:
                dyq, qdy = be.quantize_mx(dy, spec, dt, want_q=want, out=scratch(layer, "dy", dy))
            wtq, qwt = weight_operand(layer, weight, plan, "dgrad")
            dx = be.mm_nt(dyq, wtq, dt).to(ctx.x_dtype)  # [M, N] x [N, K] -> [M, K]
            if obs is not None:
                obs(layer, "dgrad", "grad_output", dy, qdy)
                obs(layer, "dgrad", "weight", weight, qwt)
        if ctx.needs_input_grad[1] and plan.hp("wgrad"):
            dw = torch.mm(dy.t(), tensors[0].to(dt)).to(weight.dtype)
        elif ctx.needs_input_grad[1]:
            # dy^T [N, M], blocks along M, from the high-precision dy
            if pair is not None:
                dytq, qdyt = pair[1], None
            else:
                buf = scratch(layer, "dyT", dy)  # the source dy's shape: blocks along its dim 0
                dytq, qdyt = be.quantize_mx(dy.t(), spec_t, dt, want_q=want, out=buf)
            if ctx.stored_meta == "hp":  # saved_input = bf16: quantize x^T along tokens now
                xtq, _ = be.quantize_mx(tensors[0].t(), plan.specs["wgrad", "input"], dt)
            elif ctx.stored_meta == "operand":  # kept as the operand itself (torch.compile)
                xtq = tensors[0]
            else:
                xtq = be.load_mx(be.unpack(tuple(tensors), ctx.stored_meta), dt)
            dw = be.mm_nt(dytq, xtq, dt).to(weight.dtype)  # [N, M] x [M, K] -> [N, K]
            if obs is not None:
                obs(layer, "wgrad", "grad_output", dy, qdyt)
        return dx, dw, None, None


def mx_forward(x2d: torch.Tensor, weight: torch.Tensor, plan: MXPlan, layer) -> torch.Tensor:
    """The MX forward GEMM alone, for calls that need no gradient (``no_grad``, eval with
    frozen weights...): no wgrad copy of x, no dgrad copy of W, nothing saved."""
    obs = None if layer is None else layer.observing()
    xq, _, qx, _ = _x_copies(x2d, plan, layer, obs is not None, need_wgrad=False)
    if plan.hp("fprop"):
        return torch.mm(xq, weight.to(plan.compute_dtype).t())
    wq, qw = weight_operand(layer, weight, plan, "fprop", pair=False)
    if obs is not None:
        obs(layer, "fprop", "input", x2d, qx)
        obs(layer, "fprop", "weight", weight, qw)
    return plan.backend.mm_nt(xq, wq, plan.compute_dtype)


def weight_operand(
    layer, weight: torch.Tensor, plan: MXPlan, gemm: str, *, pair: bool = True
) -> tuple[Any, Any]:
    """The quantized weight for ``gemm`` ("fprop": W along K, "dgrad": W^T along N).

    Quantized fresh from ``weight`` at every call, except inside a step window
    (:func:`mxfp8.layers.step_window`, open while ``layer._window_open``): the training loop
    opens one around the micro-batches of each optimizer step, when the weight cannot change,
    so they quantize it once and share the copies. Nothing outside a window can go stale: no
    signal catches every write (``p.data.mul_`` bumps neither the version counter nor the
    storage pointer), so outside a window there is no cache to invalidate. Inside one, the key
    still holds the version counter and storage pointer, a guard against a parameter replaced
    or updated in place (by tracked ops) mid-window. With an observer attached,
    ``layer.cache_weights`` False, or a window of one forward (``micro_batches=1``: nothing to
    reuse, so no copy outlives its GEMM), the cache is bypassed.

    The cache holds the copies as MX (FP8 codes and E8M0 scales: the backend's stored form,
    8.25 bits per weight and copy, at most two copies per layer, dropped when the window
    closes) and dequantizes one at each use. ``pair``: on an fprop miss, make the dgrad copy
    too (shared passes); False when no input gradient will be needed (inference, frozen
    input), so the dgrad copy is never made. ``layer.weight_quantizations`` counts every copy
    made; ``layer`` is None under torch.compile, which bypasses the cache and counts nothing.
    """
    hp = weight if gemm == "fprop" else weight.t()
    spec = plan.specs[gemm, "weight"]
    be, dt = plan.backend, plan.compute_dtype
    if plan.weight_tile:
        return _tiled_weight(layer, weight, plan, gemm)
    if layer is None:
        return be.quantize_mx(hp, spec, dt)
    observer = layer.observing()
    caching = layer._window_open and layer._window_reuse and layer.cache_weights
    if not (caching and observer is None):
        layer.weight_quantizations += 1
        return be.quantize_mx(hp, spec, dt, want_q=observer is not None)
    key = (gemm, weight._version, weight.data_ptr(), dt, be.name)
    cache = layer._weight_cache
    if key not in cache:
        both = None
        with torch.no_grad():
            if gemm == "fprop" and pair:  # both copies of W in shared passes
                both = be.store_pair(weight, spec, plan.specs["dgrad", "weight"])
            for g in ("fprop", "dgrad") if both is not None else (gemm,):
                for old in [k for k in cache if k[0] == g]:
                    del cache[old]  # one entry per GEMM: stale versions go
            if both is not None:
                cache[key], cache[("dgrad", *key[1:])] = both
                layer.weight_quantizations += 2
            else:
                cache[key] = be.store_mx(hp, spec)[0]
                layer.weight_quantizations += 1
    return be.load_mx(cache[key], dt), None


def _tiled_weight(layer, weight: torch.Tensor, plan: MXPlan, gemm: str) -> tuple[Any, Any]:
    """The weight operand of ``gemm`` from W's 32x32 tiles: one quantization (codes shared
    by the fprop copy, blocked along K, and the dgrad copy, along N), cached as one entry in
    a step window like the 1x32 copies. Always from the fprop weight spec (one format)."""
    from mxfp8.numerics.tiles import quantize_tiles_pair

    be, dt = plan.backend, plan.compute_dtype
    spec = plan.specs["fprop", "weight"]
    observer = None if layer is None else layer.observing()
    caching = layer is not None and layer._window_open and layer._window_reuse \
        and layer.cache_weights and observer is None  # fmt: skip
    key = ("tiles", weight._version, weight.data_ptr(), dt, be.name)
    both = layer._weight_cache.get(key) if caching else None
    if both is None:
        with torch.no_grad():
            row, col = quantize_tiles_pair(weight.detach(), spec.fmt, tile=plan.weight_tile,
                                           scale_rule=spec.scale_rule)  # fmt: skip
        both = (StoredMX(row, False), StoredMX(col, True))
        if layer is not None:
            layer.weight_quantizations += 1
            if caching:
                layer._weight_cache.clear()
                layer._weight_cache[key] = both
    stored = both[0] if gemm == "fprop" else both[1]
    return be.load_mx(stored, dt), (stored.q if observer is not None else None)


def weight_cache_nbytes(layer) -> int:
    """Bytes the layer's weight cache holds now (distinct storages)."""
    seen: dict[int, int] = {}
    for stored in layer._weight_cache.values():
        for t in _tensors(stored):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _tensors(item)
