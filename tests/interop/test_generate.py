"""Generation: the KV cache changes no token, sampling is reproducible, the filters work, and
bad requests are refused before any compute."""

from __future__ import annotations

import pytest
import torch

from mxfp8.errors import UserError
from mxfp8.interop.generate import _filter, generate
from mxfp8.layers.convert import convert_model
from mxfp8.layers.recipe import recipe
from mxfp8.model.attention import KVCache
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer

CFG = model_config("tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                   vocab_size=96, max_seq_len=64, tie_embeddings=False)  # fmt: skip


def _model(name="bf16"):
    torch.manual_seed(0)
    model = Transformer(CFG)
    with torch.no_grad():  # larger logits than the init's: sampling is not uniform
        model.output.weight.mul_(5)
    return convert_model(model, recipe(name)) if recipe(name).quantized else model


def test_cached_logits_equal_a_full_forward():
    model = _model().eval()
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(CFG.n_layers)
        parts = [model(idx[:, :7], cache=cache)[0], model(idx[:, 7:12], cache=cache)[0]]
        parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(12, 20)]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["bf16", "mxfp8"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_gives_the_same_tokens_under_any_recipe(name, temperature):
    model = _model(name)
    kw = dict(max_new_tokens=24, temperature=temperature, top_k=20, top_p=0.9, seed=3)
    with_cache = list(generate(model, [5, 6, 7], **kw))
    without = list(generate(model, [5, 6, 7], use_cache=False, **kw))
    assert with_cache == without and len(with_cache) == 24


def test_greedy_is_argmax_and_sampling_follows_the_seed():
    model = _model()
    greedy = list(generate(model, [1, 2], max_new_tokens=10))
    seq = [1, 2]
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert greedy == seq[2:]
    a = list(generate(model, [1, 2], max_new_tokens=30, temperature=1.0, seed=0))
    b = list(generate(model, [1, 2], max_new_tokens=30, temperature=1.0, seed=0))
    c = list(generate(model, [1, 2], max_new_tokens=30, temperature=1.0, seed=1))
    assert a == b and a != c and a != greedy
    assert list(generate(model, [1, 2], max_new_tokens=10, temperature=0.7, top_k=1)) == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert torch.isfinite(_filter(logits, 2, 1.0)).tolist() == [False, True, False, True]
    probs = torch.softmax(logits, -1)  # sorted: 0.64, 0.24, 0.09, 0.03
    assert probs[1] > 0.6
    kept = torch.isfinite(_filter(logits, 0, 0.7)).tolist()
    assert kept == [False, True, False, True]  # 0.64 < 0.7: the second token is needed
    assert torch.isfinite(_filter(logits, 0, 0.5)).tolist() == [False, True, False, False]


def test_bad_requests_are_refused():
    model = _model()
    for kw, message in (
        ({"max_new_tokens": 70}, "exceeds the model's max_seq_len 64"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
        ({"max_new_tokens": 4, "temperature": -1}, "--temperature must be >= 0"),
        ({"max_new_tokens": 4, "top_p": 0}, "--top-p must be in"),
    ):
        with pytest.raises(UserError, match=message):
            list(generate(model, [1], **kw))
    with pytest.raises(UserError, match="prompt is empty"):
        list(generate(model, [], max_new_tokens=2))
