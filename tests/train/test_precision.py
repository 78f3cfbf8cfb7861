"""The fp32 and fp16 baselines: the training step, the validation pass and the loss scaler
follow the recipe's compute dtype."""

from __future__ import annotations

import pytest
import torch

from mxfp8.config.train_config import load_config
from mxfp8.layers.recipe import recipe
from mxfp8.train import golden, session
from mxfp8.train.loop import evaluate
from mxfp8.train.step import micro_batch, run_step


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Exact comparisons of training numbers: one torch thread (tests/conftest.py)."""


def _session(tmp_path, cache, name):
    over = {**golden.OVERRIDES, "data.cache_dir": str(cache), "recipe.name": name,
            "run.out": str(tmp_path)}  # fmt: skip
    return session.build(load_config(None, over), tmp_path, lambda _t: None)


def _loss(s, x, y, dtype):
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        return float(s.model(x, y)[1])


@pytest.mark.parametrize(("name", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16),
                                             ("bf16", torch.bfloat16)])  # fmt: skip
def test_the_step_runs_in_the_recipes_dtype(name, dtype, tmp_path, data_cache):
    s = _session(tmp_path, data_cache, name)
    x, y = micro_batch(s, 1, 0)
    want = _loss(s, x, y, dtype)
    others = {_loss(s, x, y, d) for d in (torch.float32, torch.float16, torch.bfloat16)
              if d != dtype}  # fmt: skip
    assert want not in others  # the three precisions give three different losses here
    assert evaluate(s.model, [(x, y)], s.device, recipe=s.recipe) == want
    metrics = run_step(s, 1, s.model)
    assert metrics["loss"] == want


def test_fp16_scales_the_loss_and_bf16_fp32_do_not(tmp_path, data_cache):
    scaled = {n: _session(tmp_path / n, data_cache, n).loss_scaling for n in ("fp16", "fp32")}
    assert scaled == {"fp16": True, "fp32": False}
    assert recipe("fp16").dynamic_loss_scaling and not recipe("bf16").dynamic_loss_scaling


def test_fp16_compute_is_refused_for_quantized_recipes():
    with pytest.raises(ValueError, match="compute_dtype 'fp16' is for the unquantized"):
        recipe("mxfp8", compute_dtype="fp16")
    assert recipe("mxfp8", compute_dtype="fp32").compute_dtype == "fp32"
    with pytest.raises(ValueError, match="allowed: 'bf16', 'fp16', 'fp32'"):
        recipe("bf16", compute_dtype="fp64")


def test_autocast_contexts():
    with recipe("fp32").autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with recipe("fp16").autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.float16
    with recipe("mxfp8").autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
