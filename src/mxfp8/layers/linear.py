"""MXLinear: a drop-in ``nn.Linear`` whose three GEMMs run in MXFP8 (or per-tensor FP8).

Drop-in means: it *is* an ``nn.Linear`` (subclass), with the same ``weight``/``bias``
parameters and the same ``state_dict`` keys, so a checkpoint moves between a bf16 run and an
MXFP8 run unchanged. Master weights stay in their own dtype (fp32); only GEMM operands are
quantized; bias and output stay in high precision.

Precision. The GEMM output dtype (the "compute dtype") is the autocast dtype when autocast is
on for the input's device (bf16, as ``nn.Linear`` under autocast), else the input's dtype.
Gradients come back in the dtypes of x and W. With the ``bf16`` recipe (``scaling=none``) the
layer calls ``F.linear`` and is bit-identical to ``nn.Linear``.

MX recipes: see :mod:`mxfp8.layers.mx_function` for the six quantized operands (each GEMM's
operands along its reduction dim, each from the high-precision tensor) and
:mod:`mxfp8.layers.gemm` for the backends. Per-tensor recipes: see
:mod:`mxfp8.layers.tensorwise_function`, including when delayed-scaling histories advance.

Weight cache (gradient accumulation) and the step window. The quantized weight operands are
cached only inside a step window: ``with step_window(model):`` (:mod:`mxfp8.layers.step`)
around the micro-batches of one optimizer step, with ``optimizer.step()`` outside it. Inside,
the first forward quantizes the weight and every later micro-batch reuses the copies;
opening and closing the window drop them. Outside any window there is no cache at all: every
forward (and its backward) quantizes the weight fresh, so a forward after any change to the
weight's values, by any means (``optimizer.step()``, a write through ``.data``, ``copy_``,
``load_state_dict``, ``.to()``), sees the new values. Why a window and not a version check:
``p.data.mul_(2)`` bumps neither the version counter nor the storage pointer, so no check on
the tensor can see every write; the training loop knows when the weights cannot change. The
rule inside a window is therefore "do not write the weights": the cache key still holds the
version counter and storage pointer, which catches a replaced parameter and tracked in-place
updates, not ``.data`` writes. ``weight_quantizations`` counts every quantized weight copy
made, cached or not: MX makes two (W along K for fprop, W^T along N for dgrad) per window, or
per forward+backward outside one (with ``compile_quantize`` on CPU a window's first forward
makes both at once); per-tensor recipes make one per window, or one per forward; rowwise
recipes two, as MX (:mod:`mxfp8.layers.rowwise_function`).
The cached copies are FP8 codes plus E8M0 scales, dequantized at each use (what a layer keeps,
and in which form, is listed in :mod:`mxfp8.layers.mx_function`; ``weight_cache_nbytes()``
says what the cache holds now). ``cache_weights = False`` turns the cache off inside windows
too. Under ``torch.compile`` the
cache is bypassed (the graph recomputes it). Delayed scaling takes its step boundaries from
the same windows (see :mod:`mxfp8.layers.tensorwise_function`).

Telemetry hook. Every MXLinear has ``observer = None`` (zero cost) and ``name`` (its fqn, set by
``convert_model``). Set ``layer.observer`` to a plain callable (not an ``nn.Module``) and the
autograd Function calls ``observer(layer, gemm, operand, hp, q)`` once per quantized operand
per call, with ``gemm`` in {"fprop", "dgrad", "wgrad"}, ``operand`` in {"input", "weight",
"grad_output"}, ``hp`` the high-precision 2-D tensor as the layer holds it (x as [tokens, in],
W as [out, in], dy as [tokens, out]) and ``q`` its quantized object, of the same shape: an
``MXTensor`` for MX recipes, whose ``q.dim`` is the blocked axis (1 for fprop operands and
dgrad/grad_output, 0 for dgrad/weight and both wgrad operands), a ``TensorwiseFP8`` for
per-tensor ones, or a ``RowwiseFP8`` for rowwise ones (``q.dim`` the scaled axis, as for MX;
a GEMM of ``recipe.hp_gemms`` quantizes nothing and is not observed). fprop and
wgrad/input calls happen in forward, the others in backward. With an observer set, the weight
cache is bypassed and MX operands are built through ``quantize`` (bit-equal to the fast path,
slower). Observers are not traced by ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mxfp8.layers.gemm import MXSpec, select_backend
from mxfp8.layers.mx_function import MXLinearFunction, MXPlan, mx_forward, weight_cache_nbytes
from mxfp8.layers.recipe import (
    GEMM_OPERANDS,
    Backend,
    Recipe,
    ScalingKind,
    WeightBlock,
    recipe,
)
from mxfp8.layers.recompute import is_recomputing
from mxfp8.layers.rowwise_function import rowwise_forward
from mxfp8.layers.scratch import SHARED
from mxfp8.layers.tensorwise_function import DelayedState, TensorwiseLinearFunction
from mxfp8.numerics.backends import parse as parse_kernel

Observer = Any  # Callable[[MXLinear, str, str, Tensor, MXTensor | TensorwiseFP8], None]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype for x's device when autocast is on, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class MXLinear(nn.Linear):
    """``nn.Linear`` with quantized GEMMs as ``recipe`` says (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: Recipe | None = None,
        name: str = "",
        compile_quantize: bool = False,
        quantize_kernel: str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe if recipe is not None else _default_recipe()
        self.name = name
        self.observer: Observer | None = None
        self.cache_weights = True
        # run fake_quantize through torch.compile: much faster on CPU, but the first call per
        # shape compiles (seconds), so tests keep it off and training/benchmarks turn it on
        self.compile_quantize = compile_quantize
        # which quantization kernel (mxfp8.numerics.backends); None: compile_quantize decides
        # (the two-pass CPU kernel on CPU, Inductor on CUDA); "triton" must be asked for
        self.quantize_kernel = None if quantize_kernel is None else parse_kernel(quantize_kernel)
        self.weight_quantizations = 0
        # operands that die within a call go to the process-wide scratch pool on CPU, and
        # layers reading the same x share its copies (mxfp8.layers.scratch); False: neither
        self.reuse_buffers = True
        self._weight_cache: dict[tuple, Any] = {}
        self._window_open = False  # set by step_window: the only time the cache is used
        self._window_reuse = False  # the window has more than one forward (see step_window)
        self._plans: dict[tuple, MXPlan] = {}
        self.delayed_state = (
            DelayedState(self.recipe) if self.recipe.scaling is ScalingKind.DELAYED else None
        )
        self._check_dims()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        recipe: Recipe,
        name: str = "",
        compile_quantize: bool = False,
        quantize_kernel: str | None = None,
    ) -> MXLinear:
        """An MXLinear sharing ``linear``'s parameter objects (no copy)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",  # no throw-away init: the parameters are replaced right below
            recipe=recipe,
            name=name,
            compile_quantize=compile_quantize,
            quantize_kernel=quantize_kernel,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def _check_dims(self) -> None:
        """MX recipes: K (fprop's reduction) and N (dgrad's) must be whole blocks.

        Checked here, at construction, so the error names the layer instead of surfacing as
        a shape error inside a GEMM; tokens (wgrad's reduction) may be any count (padded).
        """
        r = self.recipe
        if r.scaling is ScalingKind.MX:
            bad = [
                (n, s)
                for n, s in (("in_features", self.in_features), ("out_features", self.out_features))
                if s % r.block_size
            ]
            if bad:
                n, s = bad[0]
                who = repr(self.name) if self.name else "(unnamed)"
                raise ValueError(
                    f"MXLinear {who} [{self.in_features}->{self.out_features}], recipe "
                    f"{r.name}: {n}={s} is not a multiple of block_size {r.block_size} (the "
                    "fprop/dgrad reduction dims must be; keep this layer in high precision, "
                    "as convert_model does)"
                )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"

    def recording(self) -> bool:
        """Whether this call's amaxes count for delayed scaling: a training forward, not a
        recomputation of one (activation checkpointing, :mod:`mxfp8.layers.recompute`)."""
        return self.training and torch.is_grad_enabled() and not is_recomputing()

    def observing(self) -> Observer | None:
        """The observer, unless this forward is a recomputation (telemetry counts once)."""
        return None if is_recomputing() else self.observer

    # --- step window (see mxfp8.layers.step) ----------------------------------------------
    def _open_window(self, reuse: bool = True) -> None:
        """A new optimizer step begins: drop cached operands, commit last step's amaxes.
        ``reuse=False``: the step has a single forward, so the cache stays off."""
        if self._window_open:
            raise RuntimeError(f"a step window is already open on MXLinear {self.name!r}")
        self._weight_cache.clear()
        if self.delayed_state is not None:
            self.delayed_state.commit()
        self._window_open = True
        self._window_reuse = reuse

    def _close_window(self) -> None:
        """The step's forwards are over (the optimizer may now write): drop the cache."""
        self._window_open = self._window_reuse = False
        self._weight_cache.clear()
        SHARED.clear()  # the shared input copy of the last forward: no longer needed

    def weight_cache_nbytes(self) -> int:
        """Bytes the quantized weight cache holds now (0 outside a step window)."""
        return weight_cache_nbytes(self)

    # --- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        if r.scaling is ScalingKind.NONE:
            return F.linear(x, self.weight, self.bias)
        dt = compute_dtype(x)
        x2d = x.reshape(-1, self.in_features)  # [M, K]: all leading dims are tokens
        if r.scaling is ScalingKind.MX:
            y2d = self._forward_mx(x2d, dt)
        elif r.scaling is ScalingKind.ROWWISE:
            y2d = self._forward_rowwise(x2d, dt)
        else:
            y2d = self._forward_tensorwise(x2d, dt)
        y = y2d.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y

    def _forward_mx(self, x2d: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        plan = self._plan(x2d.device, dt)
        layer = None if torch.compiler.is_compiling() else self
        grad = torch.is_grad_enabled() and (x2d.requires_grad or self.weight.requires_grad)
        with torch.autocast(x2d.device.type, enabled=False):  # dtypes are handled explicitly
            if not grad:  # inference: the forward GEMM only, nothing kept for backward
                return mx_forward(x2d, self.weight, plan, layer)
            return MXLinearFunction.apply(x2d, self.weight, plan, layer)

    @torch.compiler.disable  # python-side weight cache: runs eagerly inside compiled models
    def _forward_rowwise(self, x2d: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        with torch.autocast(x2d.device.type, enabled=False):  # dtypes are handled explicitly
            return rowwise_forward(x2d, self.weight, dt, self)

    @torch.compiler.disable  # python-side scaling state: runs eagerly inside compiled models
    def _forward_tensorwise(self, x2d: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        recording = self.recording()
        if self.delayed_state is not None and recording and not self._window_open:
            self.delayed_state.commit()  # outside a window each training forward is a step
        with torch.autocast(x2d.device.type, enabled=False):
            return TensorwiseLinearFunction.apply(x2d, self.weight, dt, self, recording)

    def prepare_plans(self, device: torch.device) -> None:
        """Make the plans of every compute dtype on ``device`` now: a compiled block then
        traces with its plans present, and its guards do not change after the first call."""
        if self.recipe.scaling is ScalingKind.MX:
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                self._plan(torch.device(device), dt)

    def _plan(self, device: torch.device, dt: torch.dtype) -> MXPlan:
        key = (device, dt, self.compile_quantize, self.quantize_kernel)
        plan = self._plans.get(key)
        if plan is None:
            r = self.recipe
            specs = {
                (g, o): MXSpec(r.fmt(g, o).elem(), r.block_size, r.scale_rule.value)
                for g, ops in GEMM_OPERANDS.items()
                for o in ops
            }
            tile = 32 if r.weight_block is WeightBlock.TILE else 0
            # 2-D weight tiles run on the emulated backend (scaled_mm with them is not written)
            choice = Backend.EMULATED if tile and r.backend is Backend.AUTO else r.backend
            backend = select_backend(choice, device, compiled=self.compile_quantize,
                                     kernel=self.quantize_kernel)  # fmt: skip
            plan = self._plans[key] = MXPlan(specs, backend, dt, r.saved_input,
                                             frozenset(r.hp_gemms), tile)  # fmt: skip
        return plan


def _default_recipe() -> Recipe:
    return recipe("mxfp8")
