"""What must hold on a CUDA device (``-m cuda``; each skips with a reason on CPU). The
prepared GPU check (benchmarks/gpu_check.sh) runs them first."""

from __future__ import annotations

import pytest
import torch

from mxfp8.numerics.backends import triton_available
from mxfp8.numerics.quantize import quantize

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("kernel", ["eager", "inductor", "triton"])
@pytest.mark.parametrize("dim", [0, 1])
def test_quantize_on_cuda_equals_the_cpu_reference(kernel, dim):
    if kernel == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    x = torch.randn(256, 512) * torch.logspace(-8, 8, 512)
    x[3, 5] = float("nan")
    want = quantize(x, "e4m3", dim=dim, kernel="reference")
    got = quantize(x.cuda(), "e4m3", dim=dim, kernel=kernel)
    assert torch.equal(got.data.cpu().view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(got.scale.cpu().view(torch.uint8), want.scale.view(torch.uint8))


def test_a_tiny_run_trains_checkpoints_and_resumes_on_cuda(tmp_path, data_cache):
    from mxfp8.config.train_config import load_config
    from mxfp8.train.loop import train

    over = {"data.source": "shakespeare", "data.vocab_size": 512,
            "data.cache_dir": str(data_cache), "model.n_layers": 1, "model.d_model": 64,
            "model.n_heads": 2, "model.n_kv_heads": 1, "model.ffn_hidden": 128,
            "run.steps": 4, "run.batch_size": 2, "run.seq_len": 32, "run.eval_batches": 1,
            "run.progress": False, "run.device": "cuda"}  # fmt: skip
    full = train(load_config(None, {**over, "run.out": str(tmp_path / "a")}))
    part = load_config(None, {**over, "run.out": str(tmp_path / "b"), "run.stop_after": 2})
    assert not train(part).completed
    resumed = train(load_config(None, {**over, "run.out": str(tmp_path / "b"),
                                       "run.resume": True}))  # fmt: skip
    assert full.completed and resumed.completed
    assert resumed.final_val_loss == full.final_val_loss
