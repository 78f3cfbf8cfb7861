"""Aliases for module paths of 0.1.0 that moved to their own floors (model/, data/, config/,
checkpoint/): each old module re-exports the names of the modules that replaced it and warns
once with a DeprecationWarning. Kept for one release (CHANGELOG.md lists every move)."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def reexport(namespace: dict[str, Any], old: str, *new: str) -> None:
    """Fill the old module's ``namespace`` with the public names of the modules ``new``."""
    warnings.warn(f"{old} moved to {' and '.join(new)}; the old path will be removed in a "
                  "later release", DeprecationWarning, stacklevel=3)  # fmt: skip
    for name in new:
        module = importlib.import_module(name)
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
