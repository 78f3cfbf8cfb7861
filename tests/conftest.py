"""Suite-wide settings and fixtures.

Hypothesis keeps no example database in the checkout; ``one_thread`` pins torch to one thread
for tests that compare training numbers (CPU results depend on the thread count).
"""

import pytest
from hypothesis import settings

from mxfp8.train.golden import torch_threads

settings.register_profile("mxfp8", database=None, deadline=None)
settings.load_profile("mxfp8")


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield
