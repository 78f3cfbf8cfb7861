"""Deprecated alias of ``mxfp8.checkpoint`` (moved in 0.2.0; CHANGELOG.md)."""

from mxfp8.train._moved import reexport

reexport(
    globals(),
    __name__,
    "mxfp8.checkpoint.manifest",
    "mxfp8.checkpoint.read",
    "mxfp8.checkpoint.write",
    "mxfp8.checkpoint.find",
)
