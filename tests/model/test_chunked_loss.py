"""The chunked LM head and loss against the unchunked ``F.cross_entropy(h @ W^T)``: the loss
and the gradients of h and W, in fp32 (to fp32 rounding) and under bf16 autocast (to bf16
rounding), with tied embeddings in a whole model, and the memory it exists for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mxfp8.model.chunked_loss import chunked_cross_entropy
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer


def _case(n=37, d=16, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * 2
    w = torch.randn(v, d, generator=g) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


def _grads(loss_fn, h, w, t):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = loss_fn(h, w, t)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _unchunked(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


@pytest.mark.parametrize("chunk", [1, 5, 37, 64])
def test_fp32_equals_the_unchunked_loss_and_gradients(chunk):
    h, w, t = _case()
    want = _grads(_unchunked, h, w, t)
    got = _grads(lambda a, b, c: chunked_cross_entropy(a, b, c, chunk), h, w, t)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # an explicit formula, independent of both: dlogits = softmax - onehot, over n
    logits = (h @ w.T).double()
    p = torch.softmax(logits, -1)
    p[torch.arange(len(t)), t] -= 1
    p /= len(t)
    torch.testing.assert_close(got[1].double(), p @ w.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2].double(), p.T @ h.double(), rtol=1e-5, atol=1e-7)


def test_bf16_autocast_runs_the_head_in_bf16_like_the_unchunked_one():
    h, w, t = _case(n=64, d=32, v=257)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _grads(_unchunked, h, w, t)
        got = _grads(lambda a, b, c: chunked_cross_entropy(a, b, c, 16), h, w, t)
    fp32 = _grads(_unchunked, h, w, t)
    # the same bf16 logits; fp32 softmax and loss, reduced in another order
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert (got[0] - fp32[0]).abs() > 1e-4  # and they are bf16's, not fp32's
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=1e-4)  # bf16 rounding
    torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=1e-4)


def test_a_model_with_tied_embeddings_trains_the_same_and_keeps_no_logits():
    cfg = model_config("tiny", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=128,
                       vocab_size=300, max_seq_len=32, tie_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    a = Transformer(cfg)
    b = Transformer(cfg).set_loss_chunk(24)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 300, (3, 32))
    y = torch.randint(0, 300, (3, 32))
    la = a(x, y)[1]
    logits_b, lb = b(x, y)
    assert logits_b is None
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=0)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=n)
    with torch.no_grad():  # evaluation computes the logits at once, chunking or not
        logits, loss = b(x, y)
    assert logits.shape == (3, 32, 300) and torch.equal(loss, a(x, y)[1].detach())
    with pytest.raises(ValueError, match="loss_chunk"):
        b.set_loss_chunk(-1)


def test_the_saved_state_is_one_float_per_token_not_the_logits():
    """What autograd keeps for backward: with the head chunked, nothing of [N, V]."""
    h, w, t = _case(n=256, d=16, v=4096)
    h.requires_grad_(True)
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        chunked_cross_entropy(h, w, t, 32)
    assert max(sizes) < 256 * 4096 // 8  # h (256 x 16), W (4096 x 16), targets, lse
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _unchunked(h, w, t)
    assert max(sizes) == 256 * 4096  # the whole logits
