"""The Llama-style model: shapes, presets, names recipes rely on, GQA, causality, init, and
activation checkpointing (in depth, with recipes: tests/train/test_activation_checkpointing.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mxfp8.model.attention import apply_rope, rope_tables
from mxfp8.model.config import MODEL_PRESETS, ModelConfig, model_config
from mxfp8.model.transformer import ActivationCheckpointing, Transformer

SMALL = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96)


def small(**kw) -> ModelConfig:
    return model_config("tiny", **{**SMALL, "max_seq_len": 32, **kw})


def on_meta(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    cfg = small()
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, cfg.vocab_size) and loss is None
    targets = torch.randint(0, cfg.vocab_size, (3, 20))
    logits, loss = model(idx, targets)
    assert loss.shape == () and loss.dtype == torch.float32
    # small init: the first prediction is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tiny_preset_size():
    cfg = MODEL_PRESETS["tiny"]
    assert cfg.vocab_size == 4096  # the default data vocabulary
    n = on_meta(cfg).num_params()
    assert 10e6 <= n <= 15e6, n


@pytest.mark.parametrize(
    "name, low, high",
    [("125m", 110e6, 140e6), ("350m", 320e6, 380e6), ("1b", 1.0e9, 1.4e9), ("8b", 7.9e9, 8.1e9)],
)
def test_large_presets_on_meta(name, low, high):
    model = on_meta(MODEL_PRESETS[name])
    assert low <= model.num_params() <= high
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod_name.startswith("layers."):
            # one MX block is 32 values along K, and both dims are K of some GEMM
            assert mod.in_features % 32 == 0 and mod.out_features % 32 == 0, mod_name


def test_8b_is_the_llama3_8b_shape():
    cfg = MODEL_PRESETS["8b"]
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (4096, 32, 32, 8)
    assert (cfg.ffn_hidden, cfg.vocab_size, cfg.rope_theta) == (14336, 128256, 500000.0)
    assert on_meta(cfg).num_params() == 8_030_261_248  # Llama-3-8B's published count


def test_submodule_names_recipes_convert_by():
    cfg = small()
    model = Transformer(cfg)
    mods = dict(model.named_modules())
    assert isinstance(mods["tok_embeddings"], nn.Embedding)
    for i in range(cfg.n_layers):
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo") + tuple(
            f"feed_forward.w{j}" for j in (1, 2, 3)
        ):
            lin = mods[f"layers.{i}.{name}"]
            assert type(lin) is nn.Linear and lin.bias is None
        assert f"layers.{i}.attention_norm" in mods and f"layers.{i}.ffn_norm" in mods
    assert "norm" in mods and type(mods["output"]) is nn.Linear
    kv = cfg.n_kv_heads * cfg.head_dim
    assert mods["layers.0.attention.wk"].weight.shape == (kv, cfg.d_model)
    assert mods["layers.0.feed_forward.w2"].weight.shape == (cfg.d_model, cfg.ffn_hidden)
    # RoPE tables are derived: not saved with the weights
    assert not any("rope" in k for k in model.state_dict())


def test_tied_and_untied_embeddings():
    tied, untied = Transformer(small(tie_embeddings=True)), Transformer(small(tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    extra = SMALL["vocab_size"] * SMALL["d_model"]
    assert untied.num_params() - tied.num_params() == extra
    assert tied.num_params(exclude_embeddings=True) == untied.num_params(exclude_embeddings=True)
    assert tied.num_params() - tied.num_params(exclude_embeddings=True) == extra


def _reference_attention(attn, x, cos, sin):
    """Plain softmax attention with K/V heads repeated explicitly for each query group."""
    B, T, C = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.wq(x).view(B, T, H, D).transpose(1, 2)
    k = attn.wk(x).view(B, T, KV, D).transpose(1, 2)
    v = attn.wv(x).view(B, T, KV, D).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    return attn.wo(y)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_query_attention_matches_reference(n_kv_heads):
    torch.manual_seed(1)
    model = Transformer(small(n_kv_heads=n_kv_heads))
    attn = model.layers[0].attention
    x = torch.randn(2, 10, SMALL["d_model"])
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    torch.testing.assert_close(
        attn(x, cos, sin), _reference_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-5
    )


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(2)
    model = Transformer(small())
    a = torch.randint(0, SMALL["vocab_size"], (2, 24))
    b = a.clone()
    b[:, 12:] = torch.randint(0, SMALL["vocab_size"], (2, 12))
    la, _ = model(a)
    lb, _ = model(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12], atol=1e-6, rtol=0)
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_rope_scores_depend_on_relative_position_only():
    cfg = small()
    cos, sin = rope_tables(cfg)
    torch.manual_seed(3)
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def score(m, n):
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), atol=1e-5, rtol=0)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_init_is_deterministic_under_a_seed():
    def build(seed):
        torch.manual_seed(seed)
        return Transformer(small()).state_dict()

    a, b, c = build(7), build(7), build(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])
    # residual projections start smaller so the residual stream does not grow with depth
    assert a["layers.0.attention.wo.weight"].std() < 0.7 * a["layers.0.attention.wq.weight"].std()


def test_meta_then_materialize():
    cfg = small()
    model = on_meta(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    cos, _ = rope_tables(cfg)
    assert torch.equal(model.rope_cos, cos)
    assert model.output.weight is model.tok_embeddings.weight
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert torch.isfinite(loss)


def test_runs_under_bf16_autocast_on_cpu():
    torch.manual_seed(4)
    model = Transformer(small())
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_activation_checkpointing_is_off_by_default_and_exact_in_fp32():
    """The plain fp32 model (no recipe, no autocast): same loss and gradients, same weights
    saved, fewer tensors kept for backward; eval forwards are untouched."""
    torch.manual_seed(5)
    plain = Transformer(small())
    assert plain.activation_checkpointing is ActivationCheckpointing.NONE
    ckpt = Transformer(small())
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.set_activation_checkpointing("block") is ckpt
    assert ckpt.activation_checkpointing is ActivationCheckpointing.BLOCK
    assert ckpt.state_dict().keys() == plain.state_dict().keys()  # not a weight
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))

    def loss_and_saved(model):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _, loss = model(idx, idx)
        loss.backward()
        return loss, len(saved)

    (la, na), (lb, nb) = loss_and_saved(plain), loss_and_saved(ckpt)
    assert torch.equal(la, lb) and nb < na
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    plain.eval(), ckpt.eval()
    assert torch.equal(plain(idx)[0], ckpt(idx)[0])
    ckpt.set_activation_checkpointing(ActivationCheckpointing.NONE)
    with pytest.raises(ValueError, match="choose one of 'none', 'block'"):
        ckpt.set_activation_checkpointing("layer")
    assert ckpt.activation_checkpointing is ActivationCheckpointing.NONE  # unchanged


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(d_model=66), "divisible by n_heads"),
        (dict(d_model=60, n_heads=4), "even"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(init_std=-1.0), "init_std"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        small(**bad)


def test_config_type_errors_and_preset_lookup():
    with pytest.raises(TypeError, match="n_layers"):
        small(n_layers=2.0)
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        model_config("tiny", width=3)
    assert model_config("tiny", vocab_size=512).vocab_size == 512
    assert MODEL_PRESETS["tiny"].vocab_size == 4096  # presets are not mutated by overrides
