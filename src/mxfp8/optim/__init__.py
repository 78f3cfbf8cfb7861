"""Optimizer state and gradient storage that save memory: AdamW with an 8-bit MX-blocked first
moment (:mod:`mxfp8.optim.fp8_states`, on the shared loop of :mod:`mxfp8.optim.adamw`) and
gradients held in bf16 (:mod:`mxfp8.optim.bf16_grads`).

Floor 3 (beside the stats and the parallel pieces): built on the numerics core only; the
training loop (:mod:`mxfp8.train.optim`) chooses between them from the run config.
"""
