"""Byte-level BPE tokenizer (HuggingFace ``tokenizers``): train, load, encode a corpus fast.

Byte-level means every string round-trips (``decode(encode(s)) == s``) and no text is ever
out of vocabulary: the 256 byte symbols are always in the vocabulary, merges come on top.
One special token, :data:`EOT`, separates documents in the token stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mxfp8.errors import UserError

EOT = "<|endoftext|>"
"""End-of-text token appended after every document (id 0 in tokenizers trained here)."""

# A long document is encoded in pieces cut after a newline that has a non-space character on
# both sides: the byte-level pre-tokenizer never joins tokens across such a point, so the
# pieces encode to the same ids as the whole, while encode_batch spreads them over threads.
_PIECE_CHARS = 1 << 16
_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (including the 256 bytes and EOT).

    Deterministic: the same texts in the same order give the same merges. The vocabulary may
    come out smaller than ``vocab_size`` when the corpus has fewer distinct pairs.
    """
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be > 257 (256 bytes + EOT), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (a file, or a directory that holds one).

    A file that the ``tokenizers`` library cannot parse raises :class:`mxfp8.errors.UserError`
    naming the file (the library's own exception is a bare ``Exception`` without the path).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for a bad file
        reason = " ".join(str(e).split())
        raise UserError(f"{path} is not a tokenizer.json that can be loaded ({reason})") from None


def eot_id(tok: Tokenizer) -> int | None:
    """Id of the document separator, or None when the tokenizer has no such token."""
    for name in (EOT, "</s>", "<|end_of_text|>", "[SEP]"):
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    return None


def split_long(text: str, piece_chars: int = _PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``piece_chars`` at safe points (see _CUT)."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        m = _CUT.search(text, start + piece_chars)
        if m is None:
            break
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


def encode_texts(
    tok: Tokenizer, texts: Iterable[str], *, batch_chars: int = 1 << 22
) -> Iterator[np.ndarray]:
    """Yield the token ids (int64 array) of each text, in order.

    Texts are gathered into batches of about ``batch_chars`` characters, long ones cut into
    pieces, and each batch goes through ``encode_batch_fast`` (multi-threaded, no offsets).
    Memory stays bounded by the batch, so a corpus larger than RAM can be streamed.
    """
    batch: list[list[str]] = []
    size = 0

    def flush() -> Iterator[np.ndarray]:
        flat = [p for pieces in batch for p in pieces]
        encs = iter(tok.encode_batch_fast(flat, add_special_tokens=False))
        for pieces in batch:
            parts = [np.asarray(next(encs).ids, dtype=np.int64) for _ in pieces]
            yield np.concatenate(parts)

    for text in texts:
        batch.append(split_long(text))
        size += len(text)
        if size >= batch_chars:
            yield from flush()
            batch, size = [], 0
    if batch:
        yield from flush()
