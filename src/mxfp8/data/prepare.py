"""Training data: prepare a corpus once into memory-mapped token files (batches are cut from
them by :mod:`mxfp8.data.batches`).

``prepare_data`` reads the corpus (see :mod:`mxfp8.data.sources`), holds out a
validation split, trains a byte-level BPE on the training text (or loads a given
``tokenizer.json``), and writes ``train.bin`` / ``val.bin`` (raw uint16 or uint32 token ids),
``tokenizer.json`` and ``meta.json`` into a cache folder named by a hash of the config and of
the corpus bytes. The folder is built under a temporary name and renamed into place, so a
folder that exists is complete, and a second call only hashes the corpus and maps the files.
A preparation that fails removes its temporary folder (one killed outright leaves it behind,
and the next preparation on the same host removes it), so the fixed input starts clean.

A corpus that cannot be trained on (no text, too little text for a validation split or for
one window of ``seq_len + 1`` tokens, a file that is not UTF-8, a bad .jsonl line) raises
:class:`DataError`, whose message says what was found and what is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mxfp8.data.sources import DataError, content_hash, iter_documents, resolve_source
from mxfp8.data.tokenizer import encode_texts, eot_id, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
"""Bumped whenever the prepared layout or the split rule changes (old caches are ignored)."""

MIN_TAIL_CHARS = 100
"""A document gives its tail to validation when that tail is at least this long (about one
line); shorter documents go to one split whole."""

SPLITS = ("train", "val")

__all__ = ["DataConfig", "DataError", "PreparedData", "load_prepared", "prepare_data"]


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how it is tokenized."""

    source: str = "shakespeare"
    """Built-in corpus (`shakespeare`, `kjv`) or a path to a .txt file, a directory of .txt
    files, a .jsonl or a .parquet file; several inputs separated by commas."""
    text_field: str = "text"
    """Field of each .jsonl line / column of the .parquet file that holds the text."""
    tokenizer: str = ""
    """Path to a local tokenizer.json; empty = train a byte-level BPE on the training split."""
    vocab_size: int = 4096
    """Vocabulary size of the BPE trained here (ignored when `tokenizer` is given)."""
    val_fraction: float = 0.05
    """Share of the text held out for validation (the tail of each long document)."""
    cache_dir: str = ""
    """Where prepared data is kept; empty = $MXFP8_CACHE, else ~/.cache/mxfp8."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("DataConfig.source must be a non-empty string")
        if not self.text_field:
            raise ValueError("DataConfig.text_field must be non-empty")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise TypeError(f"DataConfig.vocab_size must be an int, got {self.vocab_size!r}")
        if not 258 <= self.vocab_size <= 2**32:
            raise ValueError(
                f"DataConfig.vocab_size must be in [258, 2**32] (256 bytes + EOT at least), "
                f"got {self.vocab_size}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True, eq=False)
class PreparedData:
    """A prepared corpus: token arrays mapped from disk, and the tokenizer that made them."""

    train: np.memmap
    """Training tokens, 1-D (documents separated by the EOT token)."""
    val: np.memmap
    """Validation tokens, 1-D, never seen by the tokenizer trainer nor in `train`."""
    tokenizer: Tokenizer
    vocab_size: int
    """Number of ids of the tokenizer (the model's vocab must be at least this)."""
    path: Path
    """The cache folder holding train.bin, val.bin, tokenizer.json and meta.json."""
    meta: dict = field(default_factory=dict)
    """The content of meta.json (counts, dtype, config, corpus hash, timings)."""


def cache_root(cfg: DataConfig) -> Path:
    """The cache folder, resolved now (not at import): cfg, then $MXFP8_CACHE, then ~/.cache."""
    root = cfg.cache_dir or os.environ.get("MXFP8_CACHE") or "~/.cache/mxfp8"
    return Path(root).expanduser()


def split_document(text: str, val_fraction: float, val_chars: int, seen_chars: int):
    """(train_text, val_text) of one document, deterministic given the documents before it.

    A long document (``val_fraction * len >= MIN_TAIL_CHARS``) gives its last ``val_fraction``
    of characters to validation, cut at the next line break so that validation starts on a
    whole line. A short one goes to validation
    whole when that keeps the held-out characters so far within ``val_fraction`` of all the
    characters so far (``val_chars`` and ``seen_chars`` count the documents before this one).
    """
    if len(text) * val_fraction >= MIN_TAIL_CHARS:
        cut = int(len(text) * (1.0 - val_fraction))
        newline = text.find("\n", cut)
        cut = newline + 1 if 0 <= newline < len(text) - 1 else cut
        return text[:cut], text[cut:]
    if val_chars + len(text) <= val_fraction * (seen_chars + len(text)):
        return "", text
    return text, ""


def _split_corpus(cfg: DataConfig, sources) -> Iterator[tuple[str, str]]:
    val_chars = seen_chars = 0
    for doc in iter_documents(sources, cfg.text_field):
        train, val = split_document(doc, cfg.val_fraction, val_chars, seen_chars)
        val_chars += len(val)
        seen_chars += len(doc)
        yield train, val


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_key(cfg: DataConfig, corpus_sha: str) -> str:
    keyed = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    if cfg.tokenizer:  # the tokenizer's content matters, not where it lies
        keyed["tokenizer"] = _file_sha256(Path(cfg.tokenizer).expanduser())
        keyed.pop("vocab_size")
    blob = json.dumps({"format": FORMAT_VERSION, "config": keyed, "corpus": corpus_sha})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Tokenize the corpus of ``cfg`` into the cache (once) and map it."""
    sources = resolve_source(cfg.source)
    if cfg.tokenizer and not Path(cfg.tokenizer).expanduser().is_file():
        raise FileNotFoundError(f"DataConfig.tokenizer: no file at {cfg.tokenizer}")
    key = _cache_key(cfg, content_hash(sources))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", sources[0].name)[:40] or "data"
    final = cache_root(cfg) / "data" / f"{slug}-{key}"
    if not (final / "meta.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_tmp(final.parent)
        tmp = final.parent / f"{_TMP}{final.name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:  # on any failure (Ctrl-C included) the temporary folder goes: no half-written cache
            _build(cfg, sources, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():
                    # a folder without meta.json was not renamed here by prepare_data (which
                    # writes meta.json last): it is incomplete, replace it
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
                # else another process finished first: keep its (identical) result
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(final)


_TMP = ".tmp-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname()) or "host"


def _remove_dead_tmp(parent: Path) -> None:
    """Remove temporary folders of preparations on this host whose process is gone.

    A process killed outright (SIGKILL, a preempted node) cannot clean up after itself. The
    host is part of the name so that a cache shared between machines never loses a folder that
    another machine is still writing.
    """
    for tmp in parent.glob(f"{_TMP}*"):
        head, _, rest = tmp.name.rpartition(f"-{_host()}-")
        pid = rest.split("-", 1)[0]
        if not head or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive, but another user's
            pass


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The narrowest file dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _build(cfg: DataConfig, sources, out: Path) -> None:
    t0 = time.perf_counter()
    if cfg.tokenizer:
        tok = load_tokenizer(Path(cfg.tokenizer).expanduser())
    else:  # the tokenizer never sees the validation text
        train_texts = (t for t, _ in _split_corpus(cfg, sources) if t)
        tok = train_tokenizer(train_texts, cfg.vocab_size)
    t_tok = time.perf_counter() - t0
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    eot = eot_id(tok)
    sep = np.array([] if eot is None else [eot], dtype=dtype)

    counts = {"train": 0, "val": 0}
    n_docs = 0  # non-blank documents (blank ones never reach here)
    with open(out / "train.bin", "wb") as ftrain, open(out / "val.bin", "wb") as fval:
        files = {"train": ftrain, "val": fval}
        # encode train and val parts of every document in one stream: (train0, val0, train1, ...)
        parts = (p for pair in _split_corpus(cfg, sources) for p in pair)
        for i, ids in enumerate(encode_texts(tok, parts)):
            n_docs += i % 2 == 0
            if len(ids) == 0:
                continue
            split = SPLITS[i % 2]
            chunk = np.concatenate([ids.astype(dtype), sep])
            chunk.tofile(files[split])
            counts[split] += len(chunk)
    if n_docs == 0:
        n_files = sum(len(s.files) for s in sources)
        raise DataError(
            f"no text in data source {cfg.source!r}: its {n_files} file(s) hold no non-blank "
            "document (empty files, blank lines or empty text fields)"
        )
    for split, n in counts.items():
        if n < 2:
            total = counts["train"] + counts["val"]
            need = math.ceil(round(MIN_TAIL_CHARS / cfg.val_fraction, 6))
            raise DataError(
                f"the {split} split of {cfg.source!r} is empty: the corpus ({n_docs} "
                f"document(s), {total} tokens) is too small to hold out val_fraction="
                f"{cfg.val_fraction} of it; give a document of at least {need} characters "
                "or more documents"
            )
    tok.save(str(out / "tokenizer.json"))
    meta = {
        "format": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "eot_id": eot,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": n_docs,
        "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "tokenizer_seconds": round(t_tok, 3),
        "prepare_seconds": round(time.perf_counter() - t0, 3),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_prepared(path: str | Path) -> PreparedData:
    """Map a folder written by :func:`prepare_data`."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has data format {meta.get('format')}, need {FORMAT_VERSION}")
    dtype = np.dtype(meta["dtype"])
    train, val = (np.memmap(path / f"{s}.bin", dtype=dtype, mode="r") for s in SPLITS)
    tok = load_tokenizer(path / "tokenizer.json")
    return PreparedData(train, val, tok, int(meta["vocab_size"]), path, meta)
