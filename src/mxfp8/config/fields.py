"""Generic helpers that turn frozen config dataclasses into help text, TOML and typed values.

Every option of a run is a dataclass field; its help text lives next to it (``metadata["help"]``
or an attribute docstring). The CLI, ``--help`` and the TOML writer are generated from those
fields, so an option is declared exactly once.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import textwrap
import tomllib
import types
import typing
from typing import Any

import tomli_w

from mxfp8.errors import UserError


class ConfigError(UserError):
    """A config key or value is wrong; the message names it and says what is allowed.

    A :class:`mxfp8.errors.UserError`, so the ``mxfp8`` command reports it in one line (status 2).
    """


def opt(default: Any, help: str) -> Any:  # noqa: A002 - reads like argparse
    """A dataclass field with its help text (the one place an option is documented)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use immutable defaults (tuples) in frozen configs")
    return dataclasses.field(default=default, metadata={"help": help})


@functools.cache
def _attribute_docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after ``name: type = ...``) of ``cls``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for prev, node in zip(body, body[1:], strict=False):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def field_help(cls: type, name: str) -> str:
    """Help text of field ``name`` of dataclass ``cls`` (metadata, else attribute docstring)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            for key in ("help", "doc", "description"):
                if f.metadata.get(key):
                    return str(f.metadata[key])
    return _attribute_docstrings(cls).get(name, "")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of the init fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def field_defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def type_name(tp: Any) -> str:
    """Short human name of a type hint, for help text and error messages."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "{" + "|".join(str(m.value) for m in tp) + "}"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])} (comma-separated)"
        return f"{len(args)} {type_name(args[0])}s (comma-separated)"
    if origin is typing.Literal:
        return "{" + "|".join(str(a) for a in args) + "}"
    return str(tp).replace("typing.", "")


def _parse_toml_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a CLI string or a TOML value) to type ``tp``; errors name ``key``."""
    bad = f"invalid value {value!r} for {key} (expected {type_name(tp)})"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _parse_toml_scalar(value) if isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(bad)
    if origin is typing.Literal:
        for a in args:
            if str(a) == str(value):
                return a
        raise ConfigError(bad)
    if origin is tuple:
        items = value
        if isinstance(value, str):
            items = [s.strip() for s in value.split(",")] if value.strip() else []
        if not isinstance(items, (list, tuple)):
            raise ConfigError(bad)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise ConfigError(bad)
        return tuple(coerce(v, a, key) for v, a in zip(items, args, strict=True))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for m in tp:
            if str(m.value) == str(value) or m.name.lower() == str(value).lower():
                return m
        try:  # an Enum's own aliases (its _missing_), e.g. a former boolean spelling
            return tp(value)
        except ValueError:
            raise ConfigError(bad) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(bad)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(bad)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise ConfigError(bad) from None
                if f.is_integer():
                    return int(f)
        raise ConfigError(bad)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(bad)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(bad) from None
        raise ConfigError(bad)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(bad)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return value  # nested dataclasses are built by their owner (e.g. Recipe.from_dict)
    if isinstance(value, str):
        return _parse_toml_scalar(value)
    return value


def plain(value: Any) -> Any:
    """A TOML/JSON-friendly copy of ``value`` (Enums by value, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return plain(value.to_dict())
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def dumps_toml(data: dict[str, Any], header: str = "") -> str:
    """Write ``{section: {key: value}}`` as TOML with ``tomli_w`` (``None`` values omitted, as
    TOML has no null; nested dicts become sub-tables ``[section.key]``); ``header`` becomes
    leading ``#`` comment lines."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + ("\n" if comment else "") + tomli_w.dumps(_drop_none(plain(data)))
