"""Deprecated alias of ``mxfp8.data.tokenizer`` (moved in 0.2.0; CHANGELOG.md)."""

from mxfp8.train._moved import reexport

reexport(globals(), __name__, "mxfp8.data.tokenizer")
