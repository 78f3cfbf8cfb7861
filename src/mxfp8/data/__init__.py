"""The data floor: corpus sources (:mod:`~mxfp8.data.sources`), the byte-level BPE tokenizer
(:mod:`~mxfp8.data.tokenizer`), preparation into memory-mapped token files
(:mod:`~mxfp8.data.prepare`) and batches cut from them (:mod:`~mxfp8.data.batches`)."""

from mxfp8.data.batches import eval_batches, get_batch, require_tokens
from mxfp8.data.prepare import DataConfig, PreparedData, load_prepared, prepare_data
from mxfp8.data.sources import DataError

__all__ = [
    "DataConfig",
    "DataError",
    "PreparedData",
    "eval_batches",
    "get_batch",
    "load_prepared",
    "prepare_data",
    "require_tokens",
]
