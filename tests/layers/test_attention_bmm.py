"""Quantized attention BMMs (recipe.quantize_attention_bmm): the MX BMM Function and the
attention built from it equal an explicit computation from mxfp8.quantize bit for bit; their
SQNR against unquantized attention; the default path unchanged; a tiny training run with
telemetry of the new operands."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import mxfp8
from mxfp8.config.train_config import load_config
from mxfp8.layers.attention_bmm import BMM_GEMMS, bmm_specs, mx_attention, mx_bmm
from mxfp8.layers.convert import convert_model
from mxfp8.layers.recipe import Recipe, recipe
from mxfp8.model.attention import Attention, KVCache, apply_rope
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer
from mxfp8.train import golden
from mxfp8.train.loop import train

# every operand of a product in another format, so a swapped mapping cannot pass
MIXED = Recipe(fprop_input="e4m3", fprop_weight="e5m2", dgrad_grad_output="e5m2",
               dgrad_weight="e4m3", wgrad_grad_output="e4m3", wgrad_input="e5m2",
               scale_rule="floor", quantize_attention_bmm=True)  # fmt: skip
RECIPES = [recipe("mxfp8", quantize_attention_bmm=True), MIXED]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-for-bit comparisons: one torch thread (tests/conftest.py)."""


def deq(x, r: Recipe, gemm: str, operand: str, dim: int) -> torch.Tensor:
    """x quantized along ``dim`` with the recipe's format for (gemm, operand), in fp32."""
    t = mxfp8.quantize(x.float(), r.fmt(gemm, operand).elem(), block_size=r.block_size,
                       dim=dim, scale_rule=r.scale_rule.value, pad=True)  # fmt: skip
    return mxfp8.dequantize(t, torch.float32)


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


class Recorder:
    observer = None

    def __init__(self):
        self.calls = []
        self.observer = lambda mod, gemm, op, hp, q: self.calls.append((gemm, op, hp, q))


@pytest.mark.parametrize("r", RECIPES, ids=["mxfp8", "mixed"])
@pytest.mark.parametrize("observe", [False, True])
def test_bmm_function_equals_explicit_quantize_then_fp32_matmul(r, observe):
    # M, K, N not multiples of 32: every reduction dim zero-pads its last block
    a, b = randn(2, 3, 40, 48, seed=1), randn(2, 3, 48, 36, seed=2)
    dc = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(3))
    rec = Recorder() if observe else None
    c = mx_bmm(a, b, bmm_specs(r), "qk", rec)
    da, db = torch.autograd.grad(c, (a, b), dc)
    ref_c = torch.matmul(deq(a, r, "fprop", "input", -1), deq(b, r, "fprop", "weight", -2))
    ref_da = torch.matmul(deq(dc, r, "dgrad", "grad_output", -1),
                          deq(b, r, "dgrad", "weight", -1).transpose(-2, -1))  # fmt: skip
    ref_db = torch.matmul(deq(a, r, "wgrad", "input", -2).transpose(-2, -1),
                          deq(dc, r, "wgrad", "grad_output", -2))  # fmt: skip
    assert torch.equal(c, ref_c) and torch.equal(da, ref_da) and torch.equal(db, ref_db)
    assert not torch.allclose(c, a @ b, rtol=1e-3, atol=1e-3)  # quantization really happened
    if observe:
        got = {(g, o): (hp, q) for g, o, hp, q in rec.calls}
        assert set(got) == {("qk", "input"), ("qk", "weight"), ("qk_dgrad", "grad_output"),
                            ("qk_dgrad", "weight"), ("qk_wgrad", "grad_output"),
                            ("qk_wgrad", "input")}  # fmt: skip
        for (gemm, op), src, dim in [(("qk", "input"), a, -1), (("qk", "weight"), b, -2),
                                     (("qk_dgrad", "grad_output"), dc, -1),
                                     (("qk_dgrad", "weight"), b, -1),
                                     (("qk_wgrad", "grad_output"), dc, -2),
                                     (("qk_wgrad", "input"), a, -2)]:  # fmt: skip
            hp, q = got[gemm, op]
            g = {"qk": "fprop"}.get(gemm, gemm.removeprefix("qk_"))
            assert torch.equal(hp, src.detach()) and q.dim == dim % 4
            assert q.fmt == r.fmt(g, op).elem()
            assert torch.equal(mxfp8.dequantize(q), deq(src.detach(), r, g, op, dim))


def explicit_attention(q, k, v, do, r: Recipe):
    """Attention and its gradients step by step: quantize each operand, fp32 matmuls."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, scale = H // Hkv, 1.0 / math.sqrt(D)
    qf = q.detach().float()
    kr = k.detach().float().repeat_interleave(G, dim=1)
    vr = v.detach().float().repeat_interleave(G, dim=1)
    kt = kr.transpose(-2, -1)
    s = torch.matmul(deq(qf, r, "fprop", "input", -1), deq(kt, r, "fprop", "weight", -2))
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    p = torch.softmax((s * scale).masked_fill(~mask, float("-inf")), dim=-1)
    o = torch.matmul(deq(p, r, "fprop", "input", -1), deq(vr, r, "fprop", "weight", -2))
    # P.V backward: dp = do v^T (do, v along D), dv = p^T do (p, do along T)
    dp = torch.matmul(deq(do, r, "dgrad", "grad_output", -1),
                      deq(vr, r, "dgrad", "weight", -1).transpose(-2, -1))  # fmt: skip
    dvr = torch.matmul(deq(p, r, "wgrad", "input", -2).transpose(-2, -1),
                       deq(do, r, "wgrad", "grad_output", -2))  # fmt: skip
    ds = torch._softmax_backward_data(dp, p, -1, torch.float32).masked_fill(~mask, 0) * scale
    # QK^T backward: dq = ds k (ds, k along S), dk^T = q^T ds (q, ds along T)
    dq = torch.matmul(deq(ds, r, "dgrad", "grad_output", -1),
                      deq(kt, r, "dgrad", "weight", -1).transpose(-2, -1))  # fmt: skip
    dkt = torch.matmul(deq(qf, r, "wgrad", "input", -2).transpose(-2, -1),
                       deq(ds, r, "wgrad", "grad_output", -2))  # fmt: skip
    dk = dkt.transpose(-2, -1).reshape(B, Hkv, G, S, D).sum(2)  # G = 2: exact in any order
    dv = dvr.reshape(B, Hkv, G, S, D).sum(2)
    return o.to(q.dtype), dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.mark.parametrize("r", RECIPES, ids=["mxfp8", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S", [(40, 40), (7, 45)])  # (7, 45): queries after a KV cache
def test_attention_equals_explicit_computation(r, dtype, T, S):
    q = randn(2, 4, T, 32, seed=4, dtype=dtype)
    k, v = randn(2, 2, S, 32, seed=5, dtype=dtype), randn(2, 2, S, 32, seed=6, dtype=dtype)
    do = torch.randn(2, 4, T, 32, generator=torch.Generator().manual_seed(7))
    o = mx_attention(q, k, v, bmm_specs(r))
    grads = torch.autograd.grad(o, (q, k, v), do.to(dtype))
    ref = explicit_attention(q, k, v, do.to(dtype).float(), r)
    for got, want in zip((o, *grads), ref, strict=True):
        assert got.dtype == dtype and torch.equal(got, want)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.detach().double(), x.detach().double()
    return 10 * math.log10(ref.square().sum() / (ref - x).square().sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_sqnr_against_unquantized_attention(seed):
    """Measured on Gaussian data (B 2, 4 query / 2 KV heads, T 64, D 32), mxfp8: output
    26.3-27.0 dB, dq 24.1-24.4, dk 24.0-24.5, dv 26.1-26.8. Bound 21 dB: 3 dB of margin;
    a wrong axis or a lost gradient term gives well under 10 dB."""
    q = randn(2, 4, 64, 32, seed=10 + seed)
    k, v = randn(2, 2, 64, 32, seed=20 + seed), randn(2, 2, 64, 32, seed=30 + seed)
    do = torch.randn(2, 4, 64, 32, generator=torch.Generator().manual_seed(40 + seed))
    o = mx_attention(q, k, v, bmm_specs(RECIPES[0]))
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    o_ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = (o_ref, *torch.autograd.grad(o_ref, (q, k, v), do))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got, strict=True):
        assert 21 < sqnr_db(a, b) < 35, name  # < 35: the operands really are FP8


CFG = model_config("tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                   vocab_size=96, max_seq_len=64, tie_embeddings=False)  # fmt: skip


def sdpa_forward(self, x, cos, sin, cache=None, layer=0):
    """Attention.forward as it was before quantized BMMs existed (verbatim)."""
    B, T, C = x.shape
    q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
    k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    past = 0
    if cache is not None:
        past = cache.pos
        k, v = cache.update(layer, k, v)
    mask = None
    if past and T > 1:
        mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past,
                                       enable_gqa=self.n_kv_heads != self.n_heads)  # fmt: skip
    return self.wo(y.transpose(1, 2).reshape(B, T, C))


def _run(model, idx):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    cache, parts = KVCache(CFG.n_layers), []
    with torch.no_grad():
        for a, b in ((0, 9), (9, 10), (10, 16)):
            parts.append(model(idx[:, a:b], cache=cache)[0])
    return logits, grads, torch.cat(parts, dim=1)


def test_field_false_leaves_the_model_as_before(monkeypatch):
    torch.manual_seed(0)
    model = convert_model(Transformer(CFG), recipe("mxfp8"))
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    assert all(b.attention.bmm_recipe is None for b in model.layers)
    assert model.mxfp8_report.attention_bmm == []
    now = _run(model, idx)
    with monkeypatch.context() as m:
        m.setattr(Attention, "forward", sdpa_forward)
        before = _run(model, idx)
    convert_model(model, recipe("mxfp8", quantize_attention_bmm=True))
    assert model.mxfp8_report.attention_bmm == ["layers.0.attention", "layers.1.attention"]
    quantized = _run(model, idx)
    convert_model(model, recipe("mxfp8"))  # back to SDPA
    again = _run(model, idx)
    for a, b, c, d in zip(now, before, quantized, again, strict=True):
        a, b, c, d = (torch.cat([t.flatten() for t in x]) if isinstance(x, list) else x
                      for x in (a, b, c, d))  # fmt: skip
        assert torch.equal(a, b) and torch.equal(a, d)
        assert not torch.equal(a, c)  # the flag does change the numbers


def test_quantized_kv_cache_matches_a_full_forward():
    """The causal mask follows the cache: cached logits equal a full quantized forward up to
    V's quantization (its blocks along the keys hold fewer keys in the earlier cached calls)."""
    torch.manual_seed(0)
    model = convert_model(Transformer(CFG), recipe("mxfp8", quantize_attention_bmm=True)).eval()
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(CFG.n_layers)
        parts = [model(idx[:, :9], cache=cache)[0], model(idx[:, 9:10], cache=cache)[0]]
    got = torch.cat(parts, dim=1)
    assert torch.allclose(got, full[:, :10], atol=1e-2, rtol=0)


def test_per_layer_recipes_reach_the_attention_bmms():
    """A block kept in bf16 keeps SDPA; an override to another MX preset brings its formats."""
    r = recipe("mxfp8", quantize_attention_bmm=True, keep_first_blocks=1,
               overrides=[{"pattern": "layers.1.*", "recipe": "mxfp8-e5m2-grads"}])  # fmt: skip
    model = convert_model(Transformer(CFG), r)
    assert model.layers[0].attention.bmm_recipe is None
    own = model.layers[1].attention.bmm_recipe
    assert own.quantize_attention_bmm and own.dgrad_grad_output.value == "e5m2"
    assert model.mxfp8_report.attention_bmm == ["layers.1.attention"]
    assert "attention BMMs (QK^T, PV) in MX: layers.1.attention" in str(model.mxfp8_report)


def test_recipe_needs_mx_for_quantized_attention():
    with pytest.raises(ValueError, match="quantize_attention_bmm=True is for MX recipes"):
        recipe("fp8-tensorwise", quantize_attention_bmm=True)
    with pytest.raises(ValueError, match="need an MX recipe"):
        bmm_specs(recipe("bf16"))


def test_training_with_quantized_attention_records_its_operands(tmp_path, data_cache):
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "recipe.name": "mxfp8",
            "recipe.quantize_attention_bmm": True, "run.out": str(tmp_path), "run.steps": 4,
            "run.telemetry_every": 2, "run.eval_every": 0}  # fmt: skip
    result = train(load_config(None, over))
    assert result.completed and result.skipped_steps == 0
    rows = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()]
    att = [r for r in rows if r["layer"].endswith(".attention")]
    assert {r["layer"] for r in att} == {"layers.0.attention", "layers.1.attention"}
    assert {r["step"] for r in att} == {2, 4}
    assert len(att) == 2 * 2 * 12  # steps x modules x (6 gemms x 2 operands)
    assert {r["gemm"] for r in att} == set(BMM_GEMMS)
    assert all(r["fmt"] == "e4m3" and "scale_exp_hist" in r for r in att)
    assert all(r["sqnr_db"] is not None and 15 < r["sqnr_db"] < 45 for r in att), att
    assert len(rows) - len(att) == 2 * 2 * 7 * 6  # the linears' records, as before
