"""Suite-wide settings and fixtures.

Hypothesis keeps no example database in the checkout; ``one_thread`` pins torch to one thread
for tests that compare training numbers (CPU results depend on the thread count).
"""

import pytest
from hypothesis import settings

from mxfp8.train.data import DataConfig, prepare_data
from mxfp8.train.golden import torch_threads

settings.register_profile("mxfp8", database=None, deadline=None)
settings.load_profile("mxfp8")


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A cache folder holding Shakespeare with a 512-token BPE (prepared once, ~5-10 s); used
    by the training and distributed tests."""
    cache = tmp_path_factory.mktemp("mxfp8-cache")
    prepare_data(DataConfig(source="shakespeare", vocab_size=512, cache_dir=str(cache)))
    return cache
