"""Attention of the Llama-style model: rotary position embeddings, grouped-query causal
self-attention through ``scaled_dot_product_attention``, and the KV cache of generation.

With a recipe that sets ``quantize_attention_bmm``, ``convert_model`` gives each
:class:`Attention` a ``bmm_recipe`` and QK^T and P·V run as MX BMMs instead
(:mod:`mxfp8.layers.attention_bmm`); otherwise SDPA runs, unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mxfp8.layers.attention_bmm import bmm_specs, mx_attention
from mxfp8.layers.compact_activations import compact_call

if TYPE_CHECKING:
    from mxfp8.model.config import ModelConfig


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, each [max_seq_len, head_dim // 2]."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-torch.arange(half, device=device, dtype=torch.float64) / half)
    angles = torch.outer(
        torch.arange(cfg.max_seq_len, device=device, dtype=torch.float64), inv_freq
    )
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + head_dim/2]) pair by its position's angle (rotate-half form).

    x: [B, H, T, head_dim]; cos, sin: [T, head_dim // 2].
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
         gqa: bool) -> torch.Tensor:  # fmt: skip
    """Self-attention without a mask argument (what a training forward runs)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


class KVCache:
    """Keys and values of the positions a generating model has seen, per layer (inference).

    ``model(idx, cache=cache)`` runs ``idx`` as the positions after the cached ones, appends
    their keys and values, and advances :attr:`pos`; the logits equal those of one forward
    over the whole sequence (within fp32 rounding: the products are summed in another order).
    """

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's k, v [B, kv_heads, T, head_dim]; return every position's."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Causal grouped-query self-attention: n_heads query heads share n_kv_heads K/V heads.

    ``bmm_recipe`` (set by ``convert_model`` on modules declaring ``supports_quantized_bmm``):
    an MX recipe quantizing QK^T and P·V, or None (SDPA). ``observer`` and ``name`` serve
    telemetry, as on MXLinear."""

    supports_quantized_bmm = True
    bmm_recipe = None
    compact = False  # save q, k, v for backward as MX (Transformer.set_compact_activations)
    recompute_out = False  # save q, k, v whole, recompute SDPA's output in backward (exact)
    compact_compiled = False
    observer = None
    name = ""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:  # fmt: skip
        B, T, C = x.shape
        # [B, T, heads * head_dim] -> [B, heads, T, head_dim]
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)
        if self.bmm_recipe is not None:  # MX QK^T and P.V (the causal mask follows the cache)
            y = self._mx_attention(q, k, v)
            return self.wo(y.transpose(1, 2).reshape(B, T, C))
        mask = None
        if past and T > 1:  # query i (position past + i) sees keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        gqa = self.n_kv_heads != self.n_heads
        if (self.compact or self.recompute_out) and cache is None:
            # q, k, v saved as MX (compact) or whole; SDPA recomputed in backward from them
            flags = (self.compact,) * 3 + (False, False)
            y = compact_call(sdpa, q, k, v, not past, gqa, compact=flags,
                             compiled=self.compact_compiled)  # fmt: skip
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past,
                                               enable_gqa=gqa)  # fmt: skip
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, heads, T, head_dim] -> [B, T, C]
        return self.wo(y)

    @torch.compiler.disable  # python-side observer and specs: runs eagerly in compiled models
    def _mx_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return mx_attention(q, k, v, bmm_specs(self.bmm_recipe), module=self)
