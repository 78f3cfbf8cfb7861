"""Deprecated alias of ``mxfp8.config`` (moved in 0.2.0; CHANGELOG.md)."""

from mxfp8.train._moved import reexport

reexport(
    globals(), __name__, "mxfp8.config.fields", "mxfp8.config.sections", "mxfp8.config.train_config"
)
