"""The model floor: the Llama-style decoder (:mod:`~mxfp8.model.transformer`, attention and
RoPE in :mod:`~mxfp8.model.attention`), its shapes and presets (:mod:`~mxfp8.model.config`),
transformers' Llama naming (:mod:`~mxfp8.model.llama`) and the reading of Llama directories
(:mod:`~mxfp8.model.pretrained`). It knows nothing of data, configs or training."""

from mxfp8.model.attention import KVCache
from mxfp8.model.config import MODEL_PRESETS, ModelConfig, model_config
from mxfp8.model.transformer import (
    ActivationCheckpointing,
    Transformer,
    eval_mode,
    inference_forward,
)

__all__ = [
    "MODEL_PRESETS",
    "ActivationCheckpointing",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "eval_mode",
    "inference_forward",
    "model_config",
]
