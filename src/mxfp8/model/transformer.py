"""A Llama-style decoder-only transformer, written to be read top to bottom.

RMSNorm, rotary position embeddings (RoPE), a SwiGLU MLP and grouped-query attention through
``torch.nn.functional.scaled_dot_product_attention``. Every linear layer of a block is a plain
``nn.Linear`` attribute with a stable name (``layers.{i}.attention.wq``,
``layers.{i}.feed_forward.w1``, ...), because recipes swap them for ``MXLinear`` by name; the
attention BMMs themselves stay in high precision, inside SDPA, unless the recipe quantizes
them (``quantize_attention_bmm``: :mod:`mxfp8.model.attention`).

Weights on the ``meta`` device are supported: build the model under ``torch.device("meta")``
to count parameters of a large preset without allocating it, or call ``to_empty(device=...)``
then ``init_weights()`` to materialize it.

Activation checkpointing (``model.set_activation_checkpointing("block")``, the run option
``run.activation_checkpointing``) keeps only each block's input during the forward pass and
recomputes the block's forward during backward, when its gradient is needed: activation
memory drops from every intermediate of every block to one residual-stream tensor per block
(plus one block's intermediates at a time), for about one extra forward pass of compute.
Results are bit-identical to a plain run: the replay runs the same ops on the same inputs
under the same autocast and RNG state. The replay runs inside
:func:`mxfp8.layers.recompute.recomputing`, so MX layers neither record delayed-scaling amaxes
nor call their telemetry observer again: both see each forward once. Module hooks of a block
and its submodules do run again in the replay (pre-hooks always; the replay stops as soon as
backward has what it needs, so later hooks may not), and can ask
:func:`~mxfp8.layers.recompute.is_recomputing` which call they are in. Only training forwards
with grad enabled are checkpointed; evaluation and ``no_grad`` forwards run plainly.

One condition for delayed scaling: the replay quantizes with the layer's current history, so
that history must not advance between a forward and its backward. Inside a step window it
cannot (the training loop); outside windows every recording forward advances it, so run each
forward's backward before the next training forward. Under ``torch.compile`` of the whole
model the compiler does the recomputation inside its own graph, and its numbers are not the
plain run's (seen on CPU in bf16), so the run config refuses ``run.compile = model`` together
with checkpointing. Compiled blocks (``run.compile = block``,
:mod:`mxfp8.model.compiled_blocks`) are checkpointed from outside: the replay runs the same
compiled graph, so checkpointing them changes no number.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mxfp8.layers.compact_activations import CompactSaved, compact_call
from mxfp8.layers.recompute import recomputing
from mxfp8.model.attention import Attention, KVCache, rope_tables
from mxfp8.model.chunked_loss import chunked_cross_entropy
from mxfp8.model.compiled_blocks import block_call
from mxfp8.model.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32 so that bf16 inputs do not lose the mean square."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b: the gate of the SwiGLU MLP."""
    return F.silu(a) * b


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learned gain. ``compact``: save the input for backward as MX
    (:mod:`mxfp8.layers.compact_activations`; set through
    :meth:`Transformer.set_compact_activations`)."""

    compact = False
    compact_compiled = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compact:
            return compact_call(rms_norm, x, self.weight, self.eps, compact=(True, False, False),
                                compiled=self.compact_compiled)  # fmt: skip
        return rms_norm(x, self.weight, self.eps)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x). ``compact``: save w1 x and w3 x for backward as MX."""

    compact = False
    compact_compiled = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compact:
            a, b = self.w1(x), self.w3(x)
            return self.w2(compact_call(swiglu, a, b, compact=(True, True),
                                        compiled=self.compact_compiled))  # fmt: skip
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:  # fmt: skip
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class ActivationCheckpointing(enum.StrEnum):
    """What a training forward keeps for backward (see the module docstring).

    - ``none``: every intermediate activation (fastest, most memory).
    - ``block``: only each transformer block's input; the block's forward runs again in
      backward (about one more forward pass of compute, a fraction of the activation memory).
    """

    NONE = "none"
    BLOCK = "block"

    @classmethod
    def parse(cls, mode: ActivationCheckpointing | str) -> ActivationCheckpointing:
        """``mode`` as a member; a ValueError naming the valid values for anything else."""
        try:
            return cls(mode)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(
                f"unknown activation checkpointing mode {mode!r}; choose one of {valid}"
            ) from None


def _recompute_contexts() -> tuple[contextlib.AbstractContextManager, ...]:
    """checkpoint's ``context_fn``: the first forward runs plainly, the replay is marked."""
    return contextlib.nullcontext(), recomputing()


class Transformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab_size] (and the mean next-token loss)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # RoPE tables are derived, not learned: kept out of the state dict (non-persistent).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # how training forwards trade compute for memory; not a shape property, so not in cfg
        self.activation_checkpointing = ActivationCheckpointing.NONE
        self.loss_chunk = 0  # tokens per chunk of the LM head and loss in training (0: all)
        self.init_weights()

    def set_activation_checkpointing(self, mode: ActivationCheckpointing | str) -> Transformer:
        """Checkpoint each block's forward (``"block"``) or nothing (``"none"``); returns self.

        Takes effect at the next forward, whatever was done to the blocks before (a recipe's
        ``convert_model`` swapping their linears included): the block is looked up at call
        time. Not part of the state dict: it changes memory and time, never the numbers.
        """
        self.activation_checkpointing = ActivationCheckpointing.parse(mode)
        return self

    def set_loss_chunk(self, tokens: int) -> Transformer:
        """Compute the LM head and the loss of training forwards (grad enabled, targets given)
        ``tokens`` rows at a time, so the [tokens, vocab] logits never exist whole
        (:mod:`mxfp8.model.chunked_loss`); 0 computes them at once. Such a forward returns no
        logits. Evaluation forwards (no grad) always compute them at once. Returns self."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"loss_chunk must be an int >= 0, got {tokens!r}")
        self.loss_chunk = tokens
        return self

    def set_compact_activations(
        self, which: Iterable[CompactSaved | str] = (), *, compiled: bool = False
    ) -> Transformer:
        """Save the named non-linear activations for backward as MX (``"norm"``,
        ``"attention"``, ``"swiglu"``; :class:`~mxfp8.layers.compact_activations.CompactSaved`)
        and the others whole; returns self. The forward is unchanged bit for bit; the
        gradients become those at the MX of the saved tensors. ``"attention-out"`` keeps
        SDPA's q, k, v whole but not its output: SDPA runs again in backward, and the
        gradients are unchanged bit for bit. Attention compacts only where SDPA runs (not the
        MX attention BMMs). ``compiled``: the compiled quantizers."""
        chosen = CompactSaved.parse_all([str(w) for w in which])
        kinds = {RMSNorm: CompactSaved.NORM, FeedForward: CompactSaved.SWIGLU,
                 Attention: CompactSaved.ATTENTION}  # fmt: skip
        for module in self.modules():
            kind = kinds.get(type(module))
            if kind is not None:
                module.compact = kind in chosen
                module.compact_compiled = compiled
            if kind is CompactSaved.ATTENTION:
                module.recompute_out = CompactSaved.ATTENTION_OUT in chosen
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter and the RoPE tables; deterministic under a seed.

        Parameters are visited in module order, so ``torch.manual_seed(s)`` then
        ``Transformer(cfg)`` always gives the same weights.
        """
        cfg = self.cfg
        if cfg.tie_embeddings:  # again: to_empty() gives each module its own new tensor
            self.output.weight = self.tok_embeddings.weight
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = rope_tables(cfg, device=device)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        for block in self.layers:
            for name, linear in (
                *block.attention.named_children(),
                *block.feed_forward.named_children(),
            ):
                std = residual_std if name in ("wo", "w2") else cfg.init_std
                nn.init.normal_(linear.weight, std=std)
            nn.init.ones_(block.attention_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=cfg.init_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx, targets: LongTensor [B, T]. Returns (logits [B, T, vocab], loss or None).

        The loss is the mean cross-entropy over all positions, computed in fp32 whatever the
        autocast dtype of the logits. ``cache`` (inference): ``idx`` continues the cached
        positions, whose keys and values are reused (see :class:`KVCache`). With
        :meth:`set_loss_chunk`, a training forward returns ``(None, loss)``: the logits are
        never built whole.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {start + T} exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.tok_embeddings(idx)
        # eval and no_grad forwards keep nothing for backward: there is nothing to save
        ckpt = (
            self.activation_checkpointing is ActivationCheckpointing.BLOCK
            and self.training
            and torch.is_grad_enabled()
        )
        if cache is not None and ckpt:
            raise ValueError("a KV cache is for inference: call model.eval() or use no_grad")
        for i, block in enumerate(self.layers):
            # a compiled block (run.compile = block) runs eagerly when observed or with a cache
            call = block_call(block, force_eager=cache is not None)
            if cache is not None:
                x = call(x, cos, sin, cache, i)
            elif not ckpt:
                x = call(x, cos, sin)
            elif torch.compiler.is_compiling():
                # the compiler recomputes inside its own graph and takes no context managers
                # (not bit-identical: see the module docstring; the run config refuses it)
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:  # a compiled block is checkpointed from outside: the replay runs its graph
                x = checkpoint(
                    call, x, cos, sin, use_reentrant=False, context_fn=_recompute_contexts
                )
        if cache is not None:
            cache.pos = start + T
        h = self.norm(x)
        # the head chunked only where it is a plain linear (a recipe may have converted it)
        if (targets is not None and self.loss_chunk and torch.is_grad_enabled()
                and type(self.output) is nn.Linear):  # fmt: skip
            return None, chunked_cross_entropy(h.reshape(B * T, -1), self.output.weight,
                                               targets.reshape(B * T), self.loss_chunk)  # fmt: skip
        logits = self.output(h)
        loss = None
        if targets is not None:
            # [B, T, V] -> [B*T, V]: one next-token prediction per row
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once).

        With ``exclude_embeddings``, the vocabulary-sized matrices (the embedding table and an
        untied LM head) are left out, which is the count that scaling laws use.
        """
        params = {id(p): p for p in self.parameters()}  # dedupe the tied matrix
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.output.weight.numel()
        return total


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then the mode it had (an inference forward of a model
    in training mode would still checkpoint its blocks)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def inference_forward(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor | None = None, *, recipe: Any = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one evaluation forward, shared by the training loop's validation, ``mxfp8 eval``
    (loss, perplexity, bits per byte) and task scoring: eval mode, no grad, under ``recipe``'s
    autocast (:meth:`mxfp8.layers.recipe.Recipe.autocast`; bf16 when None), so that a
    checkpoint evaluated later gives the numbers its run saw. ``model`` may be a wrapper (DDP,
    ``torch.compile``) of a :class:`Transformer`; returns what it returns."""
    if recipe is None:
        from mxfp8.layers.recipe import recipe as named

        recipe = named("bf16")
    with torch.no_grad(), eval_mode(model), recipe.autocast(idx.device.type):
        return model(idx, targets)
