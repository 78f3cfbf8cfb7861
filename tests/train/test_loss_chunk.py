"""run.loss_chunk on the path users run: a training run with the head and loss chunked follows
the unchunked run (the step-1 loss to fp32 rounding; gradients to bf16 rounding), resumes bit
for bit, and a resume that changes it is refused (it changes the rounding)."""

from __future__ import annotations

import pytest

from mxfp8.checkpoint.resume import ResumeError
from mxfp8.config.train_config import load_config
from mxfp8.train.loop import train
from mxfp8.train.runlog import read_metrics
from run_helpers import exact, small


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Compares training numbers: one torch thread (tests/conftest.py)."""


def test_a_chunked_run_follows_the_unchunked_one_and_resumes_exactly(tmp_path, data_cache):
    over = {"run.steps": 6, "run.log_every": 1, "run.eval_every": 3}
    chunked = {**over, "run.loss_chunk": 24}  # 4 x 32 tokens per micro-batch: 6 chunks
    train(load_config(None, small(tmp_path / "plain", data_cache, "mxfp8", **over)))
    train(load_config(None, small(tmp_path / "full", data_cache, "mxfp8", **chunked)))
    plain, full = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "full")
    # the same bf16 logits; the loss is reduced in another order (fp32 rounding)
    assert abs(full[0]["loss"] - plain[0]["loss"]) <= 1e-6 * plain[0]["loss"]
    assert abs(full[0]["grad_norm"] / plain[0]["grad_norm"] - 1) < 1e-3
    for a, b in zip(full, plain, strict=True):
        assert abs(a["loss"] - b["loss"]) < 2e-3 * b["loss"], a["step"]
    part = tmp_path / "part"
    train(load_config(None, small(part, data_cache, "mxfp8", **chunked, **{"run.stop_after": 3})))
    with pytest.raises(ResumeError, match="run.loss_chunk"):
        train(load_config(None, small(part, data_cache, "mxfp8", **over, **{"run.resume": True})))
    train(load_config(None, small(part, data_cache, "mxfp8", **chunked, **{"run.resume": True})))
    assert exact(read_metrics(part)) == exact(full)
