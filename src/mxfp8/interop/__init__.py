"""Trained models out of and into the training stack: Hugging Face Llama directories (bf16/fp32
or with MXFP8 weights), loading them back, and evaluation and generation on top.

A floor above ``train`` (it reads checkpoints, configs and tokenizers) and below ``report``
and ``cli``; nothing here imports ``transformers``, which only the tests and users need.
"""
