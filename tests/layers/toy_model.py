"""A model with the training model's module names (``tok_embeddings``, ``layers.<i>.attention.wq``
..., ``norm``, ``output``) and nothing else: what the conversion tests convert."""

from __future__ import annotations

from torch import nn


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))


class FeedForward(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)


class Block(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.attention = Attention(d)
        self.feed_forward = FeedForward(d, hidden)
        self.attention_norm = nn.RMSNorm(d)


class Toy(nn.Module):
    """The fqn layout of the training model (tok_embeddings, layers.i..., norm, output)."""

    def __init__(self, d=64, hidden=96, n_layers=2, vocab=100):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)
