"""Weight gradients held as MX between backward and the optimizer step (``optim.grad_dtype =
mx``): the seed's FP8 gradient storage.

Each matrix whose last dim is a multiple of 32 (:func:`~mxfp8.optim.fp8_states.blockable`:
the linear and embedding weights) is held as E4M3 codes plus one E8M0 scale per 32 along the
last dim, with the ``rceil`` scale rule: 1.03 bytes per element against bf16's 2 and fp32's 4.
Everything else (norm gains, odd shapes) is held in bf16. A held gradient is *codes times a
scalar*: unscaling (the loss scale) and clipping multiply the scalar, never the codes, so they
round nothing.

What the rest of the step sees:

- **The norm is the true one.** When a gradient is taken, the sum of its squares is computed
  from the fp32 gradient, before it is rounded, and kept with it (scaled with the scalar). The
  logged and clipped global norm is that of the fp32 gradients, not of their MX rounding.
  Under FSDP2 each rank keeps the sum over its shard; the clipping sums them over the ranks.
- **Inf/NaN** make that sum non-finite, so the step is skipped as with fp32 gradients.
- **Accumulation is in bf16.** With several micro-batches, all but the last are accumulated
  into a bf16 store (:class:`~mxfp8.optim.bf16_grads.BF16Grads`); the last micro-batch's
  gradient is added to it in fp32 and only that sum is rounded to MX, once. So gradient
  accumulation saves what bf16 gradients save until the last micro-batch, and MX's share
  after it; without accumulation, from the first gradient on.
- **The step** gives the optimizer one parameter at a time its gradient decoded to fp32 and
  multiplied by its scalar (as a DTensor laid out like the parameter under FSDP2), so the
  update is fp32 AdamW on the fp32 master weights, at the MX-rounded gradient.

Where the gradient is taken is :class:`BF16Grads`'s: as autograd accumulates it (one process)
or after DDP's all-reduce / FSDP2's reduce-scatter (:meth:`BF16Grads.absorb`). Under FSDP2 a
matrix's blocks run along the last dim while FSDP2 shards dim 0, so each rank's blocks are
those one process would form.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mxfp8.optim.adamw import local_shard
from mxfp8.optim.bf16_grads import BF16Grads
from mxfp8.optim.fp8_states import BLOCK, _like, blockable, decode, encode_


class MXHeldGrad:
    """One gradient as held (module doc): MX codes and scales (uint8 views of E4M3 / E8M0) or
    a bf16 tensor, of this rank's shard, times ``mult``; ``sq``: the float64 sum of squares
    of the fp32 gradient it was taken from, times ``mult**2``."""

    def __init__(self, full: torch.Tensor, like: torch.Tensor, kernel: dict) -> None:
        """Hold fp32 ``full`` (this rank's shard of the gradient of parameter ``like``)."""
        self.like, self.kernel = like, kernel
        self.sq = torch.linalg.vector_norm(full, dtype=torch.float64).square()
        self.mult = 1.0
        self.codes = self.scale = self.dense = None
        if blockable(like) and full.numel() > 0:
            self.codes = torch.empty(full.shape, dtype=torch.uint8, device=full.device)
            scale_shape = (*full.shape[:-1], full.shape[-1] // BLOCK)
            self.scale = torch.empty(scale_shape, dtype=torch.uint8, device=full.device)
            encode_(full, self.codes, self.scale, **kernel)
        else:
            self.dense = full.to(torch.bfloat16)

    def mul_(self, c: float) -> MXHeldGrad:
        """Multiply the gradient by ``c`` (unscaling, clipping): the scalar, not the codes."""
        c = float(c)
        self.mult *= c
        self.sq = self.sq * (c * c)
        return self

    def local_fp32(self) -> torch.Tensor:
        """This rank's shard as fp32: the decoded codes (or widened bf16) times ``mult``."""
        if self.dense is not None:
            out = self.dense.float()
        else:
            out = decode(self.codes, self.scale, **self.kernel)
        return out.mul_(self.mult) if self.mult != 1.0 else out

    def value(self) -> torch.Tensor:
        """The gradient as fp32, laid out like the parameter (a DTensor under FSDP2)."""
        return _like(self.like, self.local_fp32(), tuple(self.like.shape))

    def nbytes(self) -> int:
        held = (self.dense,) if self.dense is not None else (self.codes, self.scale)
        return sum(t.numel() * t.element_size() for t in held)


class MXGrads(BF16Grads):
    """The MX gradient store of ``named_params`` (module doc). ``hooks`` as for
    :class:`BF16Grads`; ``compiled`` / ``kernel`` choose the quantization kernel as in
    :func:`mxfp8.numerics.quantize.quantize` (every kernel gives the same bits).

    Set :attr:`last` to False before the backward of a micro-batch that is not the step's last
    (its gradients go to the bf16 accumulation store) and back to True before the last one.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, hooks: bool,
                 compiled: bool = True, kernel: str | None = None):  # fmt: skip
        super().__init__(named_params, hooks=hooks)
        self.mx: dict[int, MXHeldGrad] = {}
        self.last = True
        self.kernel = {"compiled": compiled, "kernel": kernel}

    def _take(self, p: torch.nn.Parameter) -> None:
        if not self.last:  # an earlier micro-batch: accumulate in bf16
            super()._take(p)
            return
        g = p.grad
        if g is None:
            return
        full = local_shard(g).float()
        pending = self.held.pop(id(p), None)
        if pending is not None:
            full = full + local_shard(pending).float()
        if id(p) in self.mx:  # a second absorb without a step: add what is held (rare)
            full = full + self.mx[id(p)].local_fp32()
        self.mx[id(p)] = MXHeldGrad(full, p, self.kernel)
        p.grad = None

    def _ready(self) -> dict[int, MXHeldGrad]:
        """The MX store: what holders() hand to unscaling and clipping (which multiply each
        :class:`MXHeldGrad`'s scalar) and what the step decodes."""
        return self.mx

    def _for_step(self, p: torch.nn.Parameter, held: MXHeldGrad) -> torch.Tensor:
        return held.value()

    def clear(self) -> None:
        super().clear()
        self.mx.clear()
        self.last = True


def gradient_store(named_params, grad_dtype: str, *, hooks: bool) -> BF16Grads | None:
    """The store ``optim.grad_dtype`` names: None for fp32 (the parameters' own ``.grad``),
    :class:`BF16Grads` for bf16, :class:`MXGrads` for mx."""
    if grad_dtype == "fp32":
        return None
    if grad_dtype == "bf16":
        return BF16Grads(named_params, hooks=hooks)
    if grad_dtype == "mx":
        return MXGrads(named_params, hooks=hooks)
    raise ValueError(f"grad_dtype must be fp32, bf16 or mx, not {grad_dtype!r}")
