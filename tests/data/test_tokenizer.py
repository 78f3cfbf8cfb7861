"""Byte-level BPE: lossless round trip, determinism, save/load, batched encoding."""

from __future__ import annotations

import numpy as np
import pytest

from mxfp8.data.tokenizer import (
    EOT,
    encode_texts,
    eot_id,
    load_tokenizer,
    split_long,
    train_tokenizer,
)
from mxfp8.errors import UserError

CORPUS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\n  Or to take arms against a sea of troubles\n",
    "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 320)


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be",
        "unseen words: zebra quokka 1234567890",
        "  leading spaces,\ttabs\r\nand CRLF\n\n\n",
        "unicode: café, naïve, 東京, emoji 🙂, ZWJ 👩‍👩‍👧",
        "",
    ],
)
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_vocab_and_special_token(tok):
    assert tok.get_vocab_size() <= 320
    assert eot_id(tok) == 0 and tok.id_to_token(0) == EOT
    # merges were learnt: common words take fewer tokens than their bytes
    assert len(tok.encode(" sleep").ids) < len(" sleep")


def test_training_is_deterministic(tok):
    assert train_tokenizer(CORPUS, 320).to_str() == tok.to_str()
    assert train_tokenizer(CORPUS, 300).to_str() != tok.to_str()


def test_save_and_load(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path / "tokenizer.json", tmp_path):
        loaded = load_tokenizer(where)
        assert loaded.encode(CORPUS[0]).ids == tok.encode(CORPUS[0]).ids
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")


def test_a_broken_tokenizer_file_names_the_file(tmp_path):
    (tmp_path / "broken.json").write_text('{"not": "a tokenizer"')
    with pytest.raises(UserError, match=r"broken\.json is not a tokenizer\.json that can be"):
        load_tokenizer(tmp_path / "broken.json")


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, 200)


def test_split_long_cuts_where_encoding_is_unchanged(tok):
    text = "".join(CORPUS) + "  indented line\n" * 30 + "x" * 500
    pieces = split_long(text, piece_chars=100)
    assert len(pieces) > 10 and "".join(pieces) == text
    whole = tok.encode(text, add_special_tokens=False).ids
    joined = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
    assert joined == whole


def test_encode_texts_matches_one_by_one(tok):
    texts = ["".join(CORPUS)] + CORPUS[:5] + ["", "tail"]
    expected = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    for batch_chars in (1, 50, 1 << 22):  # batches of one text, several, all
        got = list(encode_texts(tok, texts, batch_chars=batch_chars))
        assert len(got) == len(texts)
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == np.int64 and g.tolist() == e
