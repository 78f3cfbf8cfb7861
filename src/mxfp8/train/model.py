"""Deprecated alias of ``mxfp8.model`` (moved in 0.2.0; CHANGELOG.md)."""

from mxfp8.train._moved import reexport

reexport(
    globals(), __name__, "mxfp8.model.config", "mxfp8.model.attention", "mxfp8.model.transformer"
)
