"""Suite-wide settings and fixtures.

Hypothesis keeps no example database in the checkout; ``one_thread`` pins torch to one thread
for tests that compare training numbers (CPU results depend on the thread count).
"""

import os

import torch

# the Triton kernels run on CPU through Triton's interpreter; it is chosen when a kernel is
# defined, so the variable must be set before mxfp8.numerics.backends.triton_mx is first imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from mxfp8.data.prepare import DataConfig, prepare_data  # noqa: E402
from mxfp8.train.golden import torch_threads  # noqa: E402

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
