"""Under FSDP2 the MX layers quantize the all-gathered weight: each GEMM's weight operand
equals, bit for bit, the one a single process makes from the same weights."""

from __future__ import annotations

import dist_worker as worker
import pytest
import torch
from dist_launch import worker as launch_worker


def _check(tmp_path, param_dtype: str, compiled: str) -> None:
    res, _ = launch_worker(2, "copies", tmp_path, param_dtype, compiled)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # the weights really were sharded, at a row that is not a block boundary: the dgrad copy
    # (blocks along rows) is only right if it was quantized after the gather
    rows = ranks[0]["shard_rows"]
    assert rows["layers.0.attention.wq.weight"] == 48  # of 96
    assert rows["layers.0.feed_forward.w1.weight"] == 80  # of 160
    want = worker.record_weight_operands(
        worker.reference_model(param_dtype, compiled == "compiled")
    )
    # one process caches the FP8 copies inside the window; FSDP2 must not (they would pin a
    # full copy of every layer's weight on every rank until the optimizer step)
    assert int(want.pop("cache_bytes")) > 0
    assert {k.split("/")[1] for k in want} == {"fprop", "dgrad"}
    for r, got in enumerate(rank["operands"] for rank in ranks):
        assert int(got.pop("cache_bytes")) == 0, r
        assert got.keys() == want.keys()
        for key, ref in want.items():
            assert got[key].shape == ref.shape, key
            assert torch.equal(got[key].view(torch.int16), ref.view(torch.int16)), (r, key)


def test_gathered_weight_copies_equal_a_single_process_fp32_gather(tmp_path):
    _check(tmp_path, "fp32", "eager")


@pytest.mark.slow
@pytest.mark.parametrize("compiled", ["eager", "compiled"])
def test_gathered_weight_copies_equal_a_single_process_bf16_gather(tmp_path, compiled):
    _check(tmp_path, "bf16", compiled)
