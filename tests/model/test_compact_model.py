"""``Transformer.set_compact_activations`` on a whole model: the loss is the plain model's bit
for bit, the gradients move by what MX costs (not by zero, not by more), the bytes saved for
backward shrink by what the formats predict, and activation checkpointing composes with it bit
for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import mxfp8
from mxfp8.layers.convert import convert_model
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer

ALL = ("norm", "attention", "swiglu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit comparisons: one torch thread (tests/conftest.py)."""


def _model(recipe="bf16", seed=0):
    torch.manual_seed(seed)
    cfg = model_config("tiny", vocab_size=256, n_layers=2, d_model=128, n_heads=2, n_kv_heads=1,
                       ffn_hidden=256, max_seq_len=64)  # fmt: skip
    m = Transformer(cfg)
    rec = mxfp8.recipe(recipe)
    return convert_model(m, rec) if rec.quantized else m


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 64), generator=g), torch.randint(0, 256, (2, 64), generator=g)


def _step(model, x, y):
    """(loss, {name: grad}, bytes saved for backward)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    params = {id(p) for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
    loss.backward()
    seen, total = set(), 0
    for t in saved:  # distinct storages, parameters excluded (they are not activations)
        if id(t) in params or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, total


def _sqnr(a, b):
    return float(10 * torch.log10(a.float().pow(2).sum() / (a.float() - b.float()).pow(2).sum()))


@pytest.mark.parametrize("recipe", ["bf16", "mxfp8"])
def test_same_loss_gradients_within_mx_noise_fewer_saved_bytes(recipe):
    x, y = _batch()
    plain = _model(recipe)
    compact = copy.deepcopy(plain).set_compact_activations(ALL)
    loss_p, grads_p, bytes_p = _step(plain, x, y)
    loss_c, grads_c, bytes_c = _step(compact, x, y)
    assert torch.equal(loss_p, loss_c)  # the forward is untouched
    sqnr = {n: _sqnr(grads_p[n], grads_c[n]) for n in grads_p}
    assert all(s < 80 for s in sqnr.values()), sqnr  # every gradient moved (it is active) ...
    assert min(sqnr.values()) > 18, sqnr  # ... by MX noise, E4M3's ~30 dB, not more
    # per block: 2 fp32 norm inputs (and autograd's fp32 normalized copies), q/k/v/out and
    # SwiGLU's three bf16 tensors become one byte (+ 1/32) per element
    # (measured: 0.63x under bf16, whose linears keep bf16 inputs; 0.42x under mxfp8)
    assert bytes_c < {"bf16": 0.7, "mxfp8": 0.5}[recipe] * bytes_p, (bytes_c, bytes_p)


def test_activation_checkpointing_composes_bit_for_bit():
    x, y = _batch(2)
    base = _model("mxfp8", seed=3).set_compact_activations(ALL)
    ckpt = copy.deepcopy(base).set_activation_checkpointing("block")
    loss_a, grads_a, _ = _step(base, x, y)
    loss_b, grads_b, _ = _step(ckpt, x, y)
    assert torch.equal(loss_a, loss_b)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n


def test_evaluation_and_options():
    x, y = _batch(4)
    plain = _model()
    compact = copy.deepcopy(plain).set_compact_activations(["swiglu", "norm"])
    assert compact.layers[0].feed_forward.compact and compact.norm.compact
    assert not compact.layers[0].attention.compact
    with torch.no_grad():
        assert torch.equal(plain(x, y)[0], compact(x, y)[0])
    with pytest.raises(ValueError, match="unknown compact activation 'mlp'"):
        compact.set_compact_activations(["mlp"])
    compact.set_compact_activations([])
    assert not any(getattr(m, "compact", False) for m in compact.modules())


@pytest.mark.parametrize("recipe", mxfp8.list_recipes())
def test_every_recipe_keeps_its_forward_under_compact_activations(recipe):
    """The compacted ops sit outside the linear layers, so every recipe's forward (its MX,
    per-tensor, per-row or delayed-scaling linears, its MX attention BMMs) is untouched: the
    same loss bit for bit, finite gradients that moved."""
    x, y = _batch(5)
    plain = _model(recipe, seed=6)
    compact = copy.deepcopy(plain).set_compact_activations(ALL)
    loss_p, grads_p, _ = _step(plain, x, y)
    loss_c, grads_c, _ = _step(compact, x, y)
    assert torch.equal(loss_p, loss_c)
    assert all(g.isfinite().all() for g in grads_c.values())
    assert not torch.equal(grads_c["norm.weight"], grads_p["norm.weight"])


@pytest.mark.parametrize("recipe", ["bf16", "mxfp8"])
def test_attention_out_recomputes_sdpa_bit_for_bit_and_keeps_less(recipe):
    """``attention-out``: SDPA keeps q, k, v whole and not its output (wo keeps its own copy
    of that); SDPA runs again in backward. The gradients are the plain model's bit for bit,
    and what is saved shrinks by the outputs (bf16, [tokens, d_model] per block)."""
    x, y = _batch(7)
    plain = _model(recipe, seed=8)
    lean = copy.deepcopy(plain).set_compact_activations(["attention-out"])
    assert all(b.attention.recompute_out and not b.attention.compact for b in lean.layers)
    loss_p, grads_p, bytes_p = _step(plain, x, y)
    loss_l, grads_l, bytes_l = _step(lean, x, y)
    assert torch.equal(loss_p, loss_l)
    for n in grads_p:
        assert torch.equal(grads_p[n], grads_l[n]), n
    tokens, d = x.numel(), plain.cfg.d_model
    assert bytes_p - bytes_l >= plain.cfg.n_layers * tokens * d * 2, (bytes_p, bytes_l)
