"""Shared fixtures of the training tests: one small prepared corpus per test session."""

from __future__ import annotations

import pytest

from mxfp8.train.data import DataConfig, prepare_data


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A cache folder holding Shakespeare with a 512-token BPE (prepared once, ~5-10 s)."""
    cache = tmp_path_factory.mktemp("mxfp8-cache")
    prepare_data(DataConfig(source="shakespeare", vocab_size=512, cache_dir=str(cache)))
    return cache
