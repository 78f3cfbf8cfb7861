"""A tiny TOML writer for recipes and run configs: nested dicts of scalars and lists of scalars.

Reading uses the standard library (``tomllib``); Python has no TOML writer, and configs only
need tables of strings, booleans, numbers and flat lists, so this stays small instead of adding
a dependency. ``tomllib.loads(dumps(d)) == d`` for every dict this module accepts.
"""

from __future__ import annotations

import json
import math
from typing import Any

Scalar = str | bool | int | float


def _scalar(value: Any, key: str) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form, always with '.', 'e', or 'inf'
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"TOML writer: key {key!r} has unsupported type {type(value).__name__}")


def _value(value: Any, key: str) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v, key) for v in value) + "]"
    return _scalar(value, key)


def _bare_or_quoted(key: str) -> str:
    ok = key and all(c.isalnum() or c in "-_" for c in key)
    return key if ok else json.dumps(key)


def dumps(data: dict[str, Any], header: str = "") -> str:
    """Serialize a nested dict (tables = dicts; values = scalars or lists of scalars).

    ``None`` values are skipped: TOML has no null, and readers fill in defaults. ``header``
    becomes leading ``#`` comment lines.
    """
    lines: list[str] = [f"# {line}" for line in header.splitlines()]
    if lines:
        lines.append("")
    _write_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _write_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines.append("[" + ".".join(_bare_or_quoted(p) for p in path) + "]")
    for key, value in scalars.items():
        lines.append(f"{_bare_or_quoted(key)} = {_value(value, key)}")
    if scalars:
        lines.append("")
    for key, sub in tables.items():
        _write_table(sub, [*path, key], lines)
