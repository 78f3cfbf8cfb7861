"""Our Transformer as a transformers ``LlamaForCausalLM``: parameter names, config.json and the
file names of a Llama directory (read by :mod:`mxfp8.model.pretrained`, written by
:mod:`mxfp8.interop.export`).

The two models are the same function, so the export is a renaming, never a permutation:

- RMSNorm: both compute ``weight * (x / rms(x))`` in fp32 with the same epsilon;
- RoPE: both use the rotate-half form over the two halves of each head (ours:
  :func:`mxfp8.model.attention.apply_rope`; transformers' ``rotate_half``), with frequency ``i``
  equal to ``theta ** (-2i / head_dim)``; Meta's original checkpoints interleave the pairs,
  which is why conversion scripts for *them* permute q and k. The export test checks logits
  against transformers instead of assuming this;
- attention: grouped-query, causal, scaled by ``head_dim ** -0.5``, no biases;
- SwiGLU: ``w2(silu(w1 x) * w3 x)`` is ``down(silu(gate x) * up x)``;
- tied embeddings: one matrix, written once as ``model.embed_tokens.weight`` with
  ``tie_word_embeddings: true`` and no ``lm_head.weight`` entry (an empty or duplicate one is
  what broke other exporters' tied checkpoints).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mxfp8.errors import UserError
from mxfp8.model.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MX_BLOCK = 32  # MXFP8 weights: one E8M0 scale per 32 elements along K
SCALE_SUFFIX = "weight_scale_inv"  # beside an FP8 ``weight``: its E8M0 block scales

# ours -> transformers, per block (the block index is carried over)
_BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_OURS_BLOCK = re.compile(r"layers\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}


def hf_name(name: str) -> str:
    """The transformers name of one of our parameter names."""
    if name in _TOP:
        return _TOP[name]
    m = _OURS_BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    raise KeyError(f"no Llama name for parameter {name!r}")


def our_name(name: str) -> str:
    """Ours for a transformers Llama parameter name (the inverse of :func:`hf_name`)."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = _HF_BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK_BACK:
        return f"layers.{m.group(1)}.{_BLOCK_BACK[m.group(2)]}"
    raise KeyError(f"not a Llama parameter this model has: {name!r}")


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict under transformers names; a tied LM head is left out (transformers
    ties it to the embedding when it loads)."""
    out = {}
    for name, t in state.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        out[hf_name(name)] = t
    return out


def from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A transformers Llama state dict under our names; every parameter of ``cfg``'s model
    must be there, nothing else (``rotary_emb`` buffers, if a file holds them, are dropped:
    ours are derived). A tied head takes the embedding."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in state.items():
        if "rotary_emb" in name:
            continue
        try:
            out[our_name(name)] = t
        except KeyError:
            unknown.append(name)
    if cfg.tie_embeddings:
        head = out.pop("output.weight", None)
        emb = out.get("tok_embeddings.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise UserError("tie_word_embeddings is true but lm_head.weight differs from "
                            "model.embed_tokens.weight")  # fmt: skip
        if emb is not None:
            out["output.weight"] = emb
    if unknown:
        more = " ..." if len(unknown) > 5 else ""
        raise UserError(f"weights that a Llama model of this config does not have: "
                        f"{', '.join(sorted(unknown)[:5])}{more}")  # fmt: skip
    return out


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype, bos_id: int | None, eos_id: int | None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """``config.json`` of a ``LlamaForCausalLM`` computing what ``cfg``'s Transformer does.

    RoPE is given both ways: ``rope_parameters`` (transformers 5) and the older top-level
    ``rope_theta`` (transformers 4), so either major version reads the same model.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
        **(extra or {}),
    }


def model_config(config: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig of a Llama ``config.json`` (ours or one transformers wrote); anything
    this model cannot compute (biases, another activation, RoPE scaling) is refused."""

    def need(key: str):
        if key not in config:
            raise UserError(f"config.json has no {key!r}: not a Llama config")
        return config[key]

    if config.get("model_type") not in ("llama", None):
        raise UserError(f"config.json model_type is {config.get('model_type')!r}, not 'llama'")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, ok) != ok:
            raise UserError(f"config.json {key} = {config[key]!r}: this model needs {ok!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"config.json asks for RoPE scaling {rope!r}: only plain RoPE is built")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise UserError(f"config.json head_dim {head_dim} x {heads} heads != hidden_size "
                        f"{hidden}: this model needs head_dim = hidden_size / heads")  # fmt: skip
    try:
        return ModelConfig(
            vocab_size=need("vocab_size"),
            d_model=hidden,
            n_layers=need("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=config.get("num_key_value_heads") or heads,
            ffn_hidden=need("intermediate_size"),
            max_seq_len=need("max_position_embeddings"),
            rope_theta=float(theta),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"config.json does not describe a model this package builds: {e}") from None
