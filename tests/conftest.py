"""Suite-wide settings: Hypothesis keeps no example database in the checkout."""

from hypothesis import settings

settings.register_profile("mxfp8", database=None, deadline=None)
settings.load_profile("mxfp8")
