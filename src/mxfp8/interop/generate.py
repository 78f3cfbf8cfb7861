"""Text generation from a trained model: greedy at temperature 0, else sampling with top-k and
top-p (nucleus) filtering, reproducible given a seed; with a KV cache by default.

With the cache, the prompt runs once and each new token is one position through the model;
without it every step reruns the whole sequence. Both give the same tokens (the logits agree
to fp32 rounding; tested). Works under any recipe: an MX model quantizes its GEMMs as in
training, in an inference forward that keeps nothing for backward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mxfp8.errors import UserError
from mxfp8.interop.evaluate import eval_mode
from mxfp8.model.attention import KVCache
from mxfp8.model.transformer import Transformer


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def check_args(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids continuing ``prompt`` (stops after
    ``stop_id``). The prompt plus the new tokens must fit the model's ``max_seq_len``."""
    check_args(temperature, top_k, top_p, max_new_tokens)
    if not prompt:
        raise UserError("the prompt is empty: give at least one token")
    limit = model.cfg.max_seq_len
    if len(prompt) + max_new_tokens > limit:
        raise UserError(f"prompt ({len(prompt)} tokens) + --max-new-tokens {max_new_tokens} "
                        f"exceeds the model's max_seq_len {limit}")  # fmt: skip
    device = model.tok_embeddings.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seq = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = KVCache(model.cfg.n_layers) if use_cache else None
    step_input = seq
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits, _ = model(step_input, cache=cache) if use_cache else model(seq)
            last = logits[0, -1].float().cpu()
            if temperature == 0:
                token = int(torch.argmax(last))
            else:
                probs = torch.softmax(_filter(last / temperature, top_k, top_p), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            yield token
            if stop_id is not None and token == stop_id:
                return
            nxt = torch.tensor([[token]], dtype=torch.long, device=device)
            seq = torch.cat((seq, nxt), dim=1)
            step_input = nxt
