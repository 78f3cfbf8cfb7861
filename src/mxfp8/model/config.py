"""The shape of a :class:`~mxfp8.model.transformer.Transformer`: :class:`ModelConfig`, and the
named presets (``tiny`` to ``8b``) that ``model.preset`` chooses from."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class ModelConfig:
    """Shape and initialization of a :class:`Transformer`."""

    vocab_size: int = 4096
    """Number of token ids (rows of the embedding table, columns of the LM head)."""
    d_model: int = 384
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of transformer blocks."""
    n_heads: int = 6
    """Number of query heads; the head dimension is ``d_model // n_heads``."""
    n_kv_heads: int = 2
    """Number of key/value heads (grouped-query attention); must divide ``n_heads``."""
    ffn_hidden: int = 1024
    """Hidden width of the SwiGLU MLP (the out-dim of w1 and w3, the in-dim of w2)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (the RoPE table is built for it)."""
    rope_theta: float = 10000.0
    """RoPE base: frequency i of a head is ``rope_theta ** (-2i / head_dim)``."""
    norm_eps: float = 1e-5
    """Epsilon added to the mean square inside RMSNorm."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the LM head."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix; the residual projections (wo, w2) use
    ``init_std / sqrt(2 * n_layers)`` so the residual stream does not grow with depth."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"ModelConfig.{f.name} must be an int, got {value!r}")
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")
        for name in (*positive, "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of "
                f"n_kv_heads ({self.n_kv_heads})"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# Every in/out dimension of a block linear is a multiple of 32 (one MX block) in these presets.
# 125m/350m: GPT-3 small/medium widths with Llama blocks and a 32000-token vocab;
# 1b: the Llama-3.2-1B shape; 8b: the Llama-3-8B shape (the paper's largest).
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "125m": ModelConfig(
        vocab_size=32000,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_hidden=2048,
        max_seq_len=1024,
        tie_embeddings=False,
    ),
    "350m": ModelConfig(
        vocab_size=32000,
        d_model=1024,
        n_layers=24,
        n_heads=16,
        n_kv_heads=8,
        ffn_hidden=2816,
        max_seq_len=2048,
        tie_embeddings=False,
    ),
    "1b": ModelConfig(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=8192,
        max_seq_len=2048,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    "8b": ModelConfig(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with some fields replaced (validated again)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; fields are {sorted(known)}")
    return replace(MODEL_PRESETS[name], **overrides)
