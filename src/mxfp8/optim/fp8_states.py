"""AdamW with an 8-bit first moment, MX-blocked (E4M3 codes plus one E8M0 scale per 32), and
a bf16 second moment.

The first moment ``m`` is quantized with the package's own numerics core
(:func:`mxfp8.numerics.quantize`, E4M3, the ``rceil`` scale rule, blocks of 32 along the last
dim). The second moment ``v`` is kept in bf16, as FP8-LM keeps it in 16 bits: stored in 8 bits
it *stagnates*. Each step multiplies v by beta2 (0.95 by default) and adds a small term; a
5 % decay (2.5 % for sqrt(v)) is less than half a step of E4M3's 3-bit mantissa, so round to
nearest keeps the old value and v only ever grows. Measured (the first version stored sqrt(v)
in E4M3): on Gaussian gradients of spread scales, v 2.8x too large after 300 steps and Adam's
steps 0.64x fp32's; in the docs/results.md runs, a loss 1-2 % lower than fp32 AdamW's during
training, seed after seed: an optimizer with another step size, not the same one
(docs/architecture.md). bf16's 8-bit mantissa keeps half a step (0.2-0.4 %) well below the
decay. ``m`` changes by 10 % a step (beta1 0.9) and rounds without bias.

At each step m is dequantized to fp32, both moments are updated with the gradient in fp32, the
fp32 update is applied to the fp32 master weights, and only then are the new moments rounded
back: the step's own update uses the unrounded moments.

Which parameters get an 8-bit m: matrices (2-D and up) whose last dim is a multiple of 32.
Everything else (norm gains, biases, odd sizes) keeps fp32 moments: they are a negligible share
of the state, and vectors would be blocked along the dim FSDP2 shards, where a block could
straddle two ranks. Under FSDP2 a matrix's blocks run along the last dim while FSDP2 shards
dim 0, so each rank quantizes its own rows and a block never crosses a shard; the codes and
scales are then DTensors with the parameter's placements, so DCP saves and reshards them like
any other optimizer state.

State of one 8-bit parameter: ``step`` (fp32 scalar), ``exp_avg_codes`` / ``exp_avg_scale``
(uint8: E4M3 bit patterns and E8M0 exponent bits; stored as uint8 so that neither
``Optimizer.load_state_dict``, which casts floating-point state to the parameter's dtype, nor
a checkpoint format has to know the FP8 dtypes) and ``exp_avg_sq`` (bf16): 3.03 bytes per
parameter instead of 8.
"""

from __future__ import annotations

import torch

from mxfp8.numerics.formats import E4M3, ScaleRule
from mxfp8.numerics.quantize import dequantize, quantize
from mxfp8.numerics.tensor import MXTensor
from mxfp8.optim.adamw import StoredMomentsAdamW, local_shard

BLOCK = 32
MOMENTS = ("exp_avg", "exp_avg_sq")
V_DTYPE = torch.bfloat16  # the second moment of the matrices (module doc: why not 8 bits)


def blockable(p: torch.Tensor) -> bool:
    """Whether ``p`` gets 8-bit moments: a matrix whose last dim is a multiple of 32."""
    return p.dim() >= 2 and p.shape[-1] % BLOCK == 0 and p.numel() > 0


def _like(p: torch.Tensor, local: torch.Tensor, global_shape: tuple[int, ...]) -> torch.Tensor:
    """``local`` as a DTensor laid out like parameter ``p`` (a plain tensor for a plain p)."""
    if not hasattr(p, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(global_shape), stride=stride)  # fmt: skip


def _mx(codes: torch.Tensor, scale: torch.Tensor) -> MXTensor:
    """The uint8 state tensors as the MXTensor they encode (views, no copy)."""
    return MXTensor(codes.view(E4M3.torch_dtype), scale.view(torch.float8_e8m0fnu), E4M3,
                    BLOCK, codes.dim() - 1, ScaleRule.RCEIL)  # fmt: skip


def decode(codes: torch.Tensor, scale: torch.Tensor, **kernel) -> torch.Tensor:
    """fp32 values of one stored 8-bit moment (local tensors); ``kernel``: ``compiled`` /
    ``kernel`` of :func:`mxfp8.numerics.quantize.dequantize`."""
    return dequantize(_mx(codes, scale), torch.float32, **kernel)


def encode_(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, **kernel) -> None:
    """Quantize fp32 ``x`` into the existing ``codes`` / ``scale`` buffers (local tensors)."""
    quantize(x, E4M3, block_size=BLOCK, dim=-1, scale_rule=ScaleRule.RCEIL,
             out=_mx(codes, scale), **kernel)  # fmt: skip


class _Raw:
    """Hides a uint8 state tensor from ``Optimizer.load_state_dict``'s cast to fp32 (which
    would hold every moment at 4 bytes while loading, and lose nothing, but cost memory)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class AdamWFP8States(StoredMomentsAdamW):
    """AdamW with an 8-bit MX-blocked m and a bf16 v (module doc); math in fp32 on fp32 master
    weights (the loop: :class:`~mxfp8.optim.adamw.StoredMomentsAdamW`).

    ``compiled`` / ``kernel`` choose the MX quantization kernel as in
    :func:`mxfp8.numerics.quantize.quantize` (default: the compiled one of the device). All
    kernels give the same bits, so they change speed, never the result.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 compiled: bool = True, kernel: str | None = None):  # fmt: skip
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.kernel = {"compiled": compiled, "kernel": kernel}

    def init_state(self, p: torch.Tensor) -> dict:
        state: dict = {"step": torch.zeros((), dtype=torch.float32)}
        if not blockable(p):
            for key in MOMENTS:
                state[key] = torch.zeros_like(p, dtype=torch.float32)
            return state
        local = local_shard(p)
        scale_local = (*local.shape[:-1], local.shape[-1] // BLOCK)
        scale_global = (*p.shape[:-1], p.shape[-1] // BLOCK)
        codes = torch.zeros(local.shape, dtype=torch.uint8, device=local.device)
        scale = torch.zeros(scale_local, dtype=torch.uint8, device=local.device)
        state["exp_avg_codes"] = _like(p, codes, tuple(p.shape))
        state["exp_avg_scale"] = _like(p, scale, scale_global)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=V_DTYPE)
        return state

    def load(self, p: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" in state:  # fp32 moments (vectors, odd sizes): updated where they are
            return local_shard(state["exp_avg"]), local_shard(state["exp_avg_sq"])
        codes, scale = local_shard(state["exp_avg_codes"]), local_shard(state["exp_avg_scale"])
        return decode(codes, scale, **self.kernel), local_shard(state["exp_avg_sq"]).float()

    def store(self, p: torch.Tensor, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        if "exp_avg" in state:
            return
        codes, scale = local_shard(state["exp_avg_codes"]), local_shard(state["exp_avg_scale"])
        encode_(m, codes, scale, **self.kernel)
        local_shard(state["exp_avg_sq"]).copy_(v)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, keeping the codes and scales uint8 (the base class would cast them to the
        parameter's fp32, which is exact but holds 4 bytes per element while loading)."""
        raw = {
            i: {
                k: _Raw(v) if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 else v
                for k, v in s.items()
            }  # fmt: skip
            for i, s in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "state": raw})
        for p, state in self.state.items():
            for key, value in state.items():
                if isinstance(value, _Raw):
                    state[key] = value.t.to(device=p.device)
            if "exp_avg_codes" in state:  # the base class made v fp32 (exact): bf16 again
                state["exp_avg_sq"] = state["exp_avg_sq"].to(V_DTYPE)
