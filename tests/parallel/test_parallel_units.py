"""The single-process pieces of the distributed floor: torchrun's environment, the modes and
backends, the local communicator, clipping over shards, the checkpoint layouts."""

from __future__ import annotations

import math

import pytest
import torch

from mxfp8.checkpoint.manifest import (
    CheckpointError,
    build_manifest,
    verify_checkpoint,
    write_manifest,
)
from mxfp8.parallel import LOCAL, DistEnv, ParallelMode, resolve_backend, resolve_mode
from mxfp8.train import optim


def test_environment_without_torchrun_is_one_process():
    env = DistEnv.from_environ({})
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)


def test_environment_of_torchrun():
    env = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                "LOCAL_WORLD_SIZE": "2"})  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.distributed and not env.is_main
    assert DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "1"}).distributed  # a job of one


@pytest.mark.parametrize(("environ", "message"), [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "need 0 <= RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
])  # fmt: skip
def test_a_broken_environment_is_named(environ, message):
    with pytest.raises(ValueError, match=message):
        DistEnv.from_environ(environ)


def test_modes_and_backends():
    assert resolve_mode("auto", 1) is ParallelMode.NONE
    assert resolve_mode("auto", 2) is ParallelMode.FSDP
    assert resolve_mode("ddp", 1) is ParallelMode.DDP
    with pytest.raises(ValueError, match="parallel.mode = none, but this process is one of 4"):
        resolve_mode("none", 4)
    assert resolve_backend("auto", "cpu") == "gloo"
    assert resolve_backend("auto", "cuda") == "nccl"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        resolve_backend("nccl", "cpu")


def test_the_local_communicator_returns_its_input():
    t = torch.tensor([1.0, float("nan")])
    assert LOCAL.sum_(t) is t and LOCAL.max_(t) is t
    assert LOCAL.mean(2.5) == 2.5 and LOCAL.any(True) and not LOCAL.any(False)
    assert LOCAL.broadcast({"a": 1}) == {"a": 1} and LOCAL.first(None) is None
    assert not LOCAL.active


class Sharded:
    """A stand-in for a DTensor gradient: this rank's rows."""

    def __init__(self, local: torch.Tensor) -> None:
        self._local = local

    def to_local(self) -> torch.Tensor:
        return self._local


def test_norm_over_shards_is_the_norm_of_the_full_gradients():
    torch.manual_seed(0)
    full = [torch.randn(6, 4), torch.randn(8)]
    shards = [[Sharded(g[: len(g) // 2]) for g in full], [Sharded(g[len(g) // 2 :]) for g in full]]
    # the "other rank" holds the second halves: the reduction adds its sum of squares
    other = optim._norm(shards[1], reduce_sq=lambda t: t).square()

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return t.add_(other)

    got = float(optim._norm(shards[0], reduce_sq=reduce))
    want = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in full])))
    assert math.isclose(got, want, rel_tol=1e-6)
    # and without the reduction it is only this rank's part: the reduction is what counts
    assert float(optim._norm(shards[0], reduce_sq=lambda t: t)) < want * 0.9


def _checkpoint(tmp_path, names):
    d = tmp_path / "step_0000003"
    d.mkdir()
    for n in names:
        (d / n).write_bytes(n.encode())
    return d


def test_a_sharded_checkpoint_lists_and_verifies_every_shard(tmp_path):
    d = _checkpoint(tmp_path, [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt",
                               "config.toml"])  # fmt: skip
    write_manifest(d, 3)
    assert set(verify_checkpoint(d)["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp",
                                                  "state.pt", "config.toml"}  # fmt: skip
    (d / "__1_0.distcp").write_bytes(b"other")
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: size mismatch"):
        verify_checkpoint(d)


def test_a_checkpoint_without_weights_or_shards_is_refused(tmp_path):
    d = _checkpoint(tmp_path, ["state.pt", "config.toml"])
    write_manifest(d, 3)
    assert set(build_manifest(d, 3)["files"]) == {"state.pt", "config.toml"}
    with pytest.raises(CheckpointError, match="neither model.safetensors nor DCP shards"):
        verify_checkpoint(d)
