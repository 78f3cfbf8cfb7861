"""Training with several processes (torchrun, gloo on CPU) against one process on the same
global batches; agreement across ranks on skips and failures; resume at another world size.

Tolerance: a distributed run sums each weight gradient over ranks in another order than one
process does (fp32), and FSDP2 with bf16 gathers hands the layers bf16-rounded weights, so
losses match one process to a relative ``REL`` (observed: about 1e-4 after 4 steps of the
tiny model) and gradient norms to ``REL_NORM`` (observed: 3e-3 with bf16 gathers), not bit
for bit. A resume at the same world size is bit-identical.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import dist_worker as worker
import pytest
import torch
from dist_launch import metrics, mxfp8, per_rank
from dist_launch import worker as launch
from safetensors.torch import load_file, load_model

from mxfp8.cli.main import main
from mxfp8.train.checkpoint import latest_checkpoint
from mxfp8.train.config import load_config
from mxfp8.train.manifest import write_manifest
from mxfp8.train.model import Transformer

REL = 2e-3
REL_NORM = 1e-2


def _close(a: list[float], b: list[float], rel: float = REL) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b, strict=True)
    )


def _single(tmp_path, data_cache, **overrides) -> dict:
    """The same run in this process (no torchrun): the reference."""
    out = tmp_path / "single"
    worker.train_and_report(out, str(data_cache), **overrides)
    return json.loads((out / "rank0.json").read_text())


def _pairs(**overrides) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]


def _cli_common(data_cache) -> list[str]:
    return [
        "train", "--recipe", "mxfp8", "--steps", "3", "--seed", "2",
        "--data", "shakespeare", "--data.vocab_size", "512", "--data.cache_dir", str(data_cache),
        "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "2",
        "--model.n_kv_heads", "1", "--model.ffn_hidden", "128", "--run.batch_size", "4",
        "--run.seq_len", "32", "--run.log_every", "1", "--run.eval_batches", "1",
        "--run.progress", "false", "--no-report",
    ]  # fmt: skip


# --- make test: the default path, end to end --------------------------------------------------


def test_fsdp_job_on_two_processes_resumes_on_one_and_matches_one_process(
    tmp_path, data_cache, capsys
):
    """torchrun -m mxfp8 train with the defaults (parallel.mode auto = fsdp, compiled
    quantizers) stops after 2 of 3 steps; one process continues it from the DCP shards; the
    losses match a one-process run. (The one-process runs go in this process, where the
    quantizers' compiled kernels are shared: the suite stays fast.)"""
    common = _cli_common(data_cache)
    job = tmp_path / "job"
    res = mxfp8(2, [*common, "--out", str(job), "--stop-after", "2"])
    assert "stopped after step 2 of 3" in res.stdout
    assert res.stdout.count("run directory:") == 1  # rank 0 alone reports
    ckpt = job / "checkpoints" / "step_0000002"
    names = {p.name for p in ckpt.iterdir()}
    assert names >= {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt", "manifest.json"}
    assert "model.safetensors" not in names  # only the final checkpoint consolidates
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert "__1_0.distcp" in manifest["files"]  # the shards are verified like any file
    # its weights as one file, from the shards, in one process (`python -m mxfp8` as well)
    weights = tmp_path / "step2.safetensors"
    mxfp8(0, ["consolidate", str(job), "--step", "2", "--out", str(weights)])
    model = Transformer(load_config(ckpt / "config.toml").model.build())
    load_model(model, str(weights), strict=True)
    assert main(["train", "--resume", "--out", str(job), "--no-report"]) == 0
    assert "final validation loss" in capsys.readouterr().out
    ref = tmp_path / "ref"
    assert main([*common, "--out", str(ref)]) == 0
    got, want = metrics(job), metrics(ref)
    assert [m["step"] for m in got] == [1, 2, 3]
    assert _close([m["loss"] for m in got], [m["loss"] for m in want])
    assert _close([m["grad_norm"] for m in got], [m["grad_norm"] for m in want], REL_NORM)
    assert got[0]["loss"] != want[0]["loss"]  # two processes really ran (other sum order)


def test_inf_on_one_rank_makes_every_rank_skip_the_same_step(tmp_path, data_cache):
    res, _ = launch(2, "inf", tmp_path, str(data_cache), *_pairs(**{"run.steps": 3}))
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = per_rank(tmp_path, 2)
    assert r0["skips"] == r1["skips"] == [False, True, False]
    assert r0["skipped_steps"] == r1["skipped_steps"] == 1
    assert r0["losses"] == r1["losses"] and math.isnan(r0["losses"][1])
    assert r0["digest"] == r1["digest"]  # the replicas did not drift apart
    rows = metrics(tmp_path / "run")
    assert rows[1]["nonfinite"] == "loss" and rows[1]["skipped_steps"] == 1


def test_a_rank_that_raises_ends_the_job_quickly_and_names_the_error(tmp_path, data_cache):
    res, seconds = launch(2, "raise", tmp_path, str(data_cache), *_pairs(**{"run.steps": 4}),
                          timeout=180)  # fmt: skip
    assert res.returncode != 0
    assert "injected failure on rank 1 at step 2" in res.stderr
    assert seconds < 90  # start-up included; the survivor does not wait out the timeout


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, data_cache):
    res, _ = launch(2, "train", tmp_path, str(data_cache), *_pairs(**{"run.batch_size": 3}))
    assert res.returncode != 0
    assert "run.batch_size = 3 sequences cannot be split evenly over 2 processes" in res.stderr


# --- -m slow: the full matrix ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("recipe", ["bf16", "mxfp8"])
def test_two_processes_match_one_process(tmp_path, data_cache, mode, recipe):
    over = {"parallel.mode": mode, "recipe.name": recipe}
    res, _ = launch(2, "train", tmp_path / "two", str(data_cache), *_pairs(**over))
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = per_rank(tmp_path / "two", 2)
    assert r0["losses"] == r1["losses"] and r0["digest"] == r1["digest"]
    one = _single(tmp_path, data_cache, **{"recipe.name": recipe})
    assert _close(r0["losses"], one["losses"])
    assert r0["losses"] != one["losses"]


@pytest.mark.slow
def test_fp8_delayed_amax_histories_agree_across_ranks(tmp_path, data_cache):
    over = {"recipe.name": "fp8-delayed"}
    res, _ = launch(2, "train", tmp_path / "two", str(data_cache), *_pairs(**over))
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = per_rank(tmp_path / "two", 2)
    assert r0["scaling"] and r0["scaling"] == r1["scaling"]
    one = _single(tmp_path, data_cache, **over)
    assert _close(r0["losses"], one["losses"])


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(1, 2), (2, 2), (2, 4)])
def test_resume_at_another_world_size(tmp_path, data_cache, first, then):
    common = _cli_common(data_cache) + ["--run.compile_quantize", "false", "--steps", "4"]
    full, part = tmp_path / "full", tmp_path / "part"
    mxfp8(first, [*common, "--out", str(full)])
    mxfp8(first, [*common, "--out", str(part), "--stop-after", "2"])
    mxfp8(then, ["train", "--resume", "--out", str(part), "--no-report"])
    got, want = metrics(part), metrics(full)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    if first == then:  # bit-identical
        keys = ("loss", "grad_norm", "val_loss")
        assert [[m.get(k) for k in keys] for m in got] == [[m.get(k) for k in keys] for m in want]
    else:
        assert _close([m["loss"] for m in got], [m["loss"] for m in want])
    if first > 1:  # the final checkpoint's gathered weights == the shards read in one process
        final = latest_checkpoint(full)
        gathered = load_file(str(final / "model.safetensors"))
        shards_only = tmp_path / "shards_only"
        shutil.copytree(final, shards_only)
        (shards_only / "model.safetensors").unlink()
        write_manifest(shards_only, 4)
        mxfp8(0, ["consolidate", str(shards_only)])
        rebuilt = load_file(str(shards_only / "model.safetensors"))
        assert rebuilt.keys() == gathered.keys()
        assert all(torch.equal(rebuilt[k], gathered[k]) for k in gathered)


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_every_rank_at_one_step(tmp_path, data_cache):
    out = tmp_path / "run"
    argv = [*_cli_common(data_cache), "--steps", "2000", "--run.compile_quantize", "false",
            "--out", str(out)]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "mxfp8", *argv]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (
            (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3
        ):
            time.sleep(0.5)
        job.send_signal(signal.SIGTERM)
        stdout, _ = job.communicate(timeout=90)
    finally:
        job.kill()
    assert "stopped by SIGTERM after step" in stdout
    last = metrics(out)[-1]["step"]
    assert 3 <= last < 2000
    assert latest_checkpoint(out).name == f"step_{last:07d}"  # the step every rank finished
