"""The prepared GPU check runs end to end on CPU at tiny sizes (``--cpu-dry-run``), so the
script is known to work before it first meets a GPU.

What the dry run can know exactly is asserted exactly: the sections it reports, in order, and
the keys of each (which kernels, dtypes, layers and recipes it measured, at which sizes); that
every CUDA test skipped; how each derived figure follows from the measured ones (ratios,
tokens per second, the loss gap); and the two final validation losses of its ``run`` section,
bit for bit, against the same tiny runs trained here. Only the timings are free."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxfp8.config.train_config import load_config
from mxfp8.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["tests", "quantize", "linear", "train_step", "run"]
TARGETS = {"quantize_frac_of_copy": 0.70, "linear_ratio": 1.3, "step_ratio_1b": 1.3}
DTYPES = ["bfloat16", "float32"]
KERNELS = ["inductor", "triton"]  # triton: through its interpreter on CPU


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run",
                          "--json", str(out)], capture_output=True, text=True, env=env,
                         timeout=480, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout, out, json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_section_reports_once_in_order_and_nothing_else(dry_run):
    stdout, out, results = dry_run
    lines = stdout.strip().splitlines()
    assert lines[0] == f"gpu_check: torch {torch.__version__}, device cpu, dry run True"
    assert [ln.split()[:2] for ln in lines[1:-1]] == [[s, "ok"] for s in SECTIONS]
    assert lines[-1] == f"gpu_check: results in {out}"  # no "; failed: [...]"
    assert list(results) == ["device", "dry_run", "targets", *SECTIONS]
    assert results["device"] == "cpu" and results["dry_run"] is True
    assert results["targets"] == TARGETS
    for section in SECTIONS:
        assert _positive(results[section]["seconds"]), section


def test_every_cuda_test_was_collected_and_skipped(dry_run):
    tests = dry_run[2]["tests"]
    assert set(tests) == {"exit", "summary", "ok", "seconds"}
    assert tests["exit"] == 0 and tests["ok"] is True
    # the suite runs quiet (-q twice): the summary is the progress line, one letter a test
    progress = re.fullmatch(r"(\S+)\s+\[100%\]", tests["summary"])
    assert progress is not None, tests["summary"]
    # how many tests carry the cuda marker: those of tests/test_cuda.py, and only those
    marked = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
                    if re.search(r"\bmark\.cuda\b", p.read_text()))  # fmt: skip
    assert marked == ["tests/test_cuda.py"]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
                          "tests/test_cuda.py", "-p", "no:cacheprovider"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)  # fmt: skip
    n = int(re.search(r"tests/test_cuda\.py: (\d+)", res.stdout)[1])
    assert n >= 7
    assert progress[1] == "s" * n  # every one of them ran and skipped: none passed or failed


def test_quantize_measured_each_kernel_and_dtype_at_64x64(dry_run):
    q = dry_run[2]["quantize"]
    want = {"n", "seconds"} | {f"copy_{d}_gbs" for d in DTYPES}
    want |= {f"{k}_{d}_{what}" for k in KERNELS for d in DTYPES for what in ("gbs", "frac_of_copy")}
    assert set(q) == want
    assert q["n"] == 64
    for d in DTYPES:
        assert _positive(q[f"copy_{d}_gbs"])
        for k in KERNELS:
            # both figures come from one timing: GB/s over copy's GB/s is the fraction
            assert _positive(q[f"{k}_{d}_gbs"])
            frac = q[f"{k}_{d}_gbs"] / q[f"copy_{d}_gbs"]
            assert q[f"{k}_{d}_frac_of_copy"] == pytest.approx(frac, rel=1e-12)


def test_linear_timed_bf16_and_both_mx_kernels_at_64x64x64(dry_run):
    lin = dry_run[2]["linear"]
    assert set(lin) == {"64x64x64", "seconds"}
    row = lin["64x64x64"]
    layers = ["bf16", "mxfp8", "mxfp8-triton"]
    assert set(row) == {*layers, "ratio", "ratio_mxfp8", "ratio_mxfp8-triton"}
    assert all(_positive(row[name]) for name in layers)
    assert row["ratio"] == row["ratio_mxfp8"] == row["mxfp8"] / row["bf16"]
    assert row["ratio_mxfp8-triton"] == row["mxfp8-triton"] / row["bf16"]


def test_train_step_timed_the_tiny_preset_on_2x32_tokens(dry_run):
    ts = dry_run[2]["train_step"]
    assert set(ts) == {"tiny", "seconds"}
    row = ts["tiny"]
    assert set(row) == {"bf16", "mxfp8", "ratio"}
    for rec in ("bf16", "mxfp8"):
        assert set(row[rec]) == {"tokens_per_s", "step_s", "peak_mib"}
        assert _positive(row[rec]["step_s"])
        assert row[rec]["tokens_per_s"] == 2 * 32 / row[rec]["step_s"]  # batch 2 x seq 32
        assert row[rec]["peak_mib"] is None  # no CUDA allocator on CPU
    assert row["ratio"] == row["mxfp8"]["step_s"] / row["bf16"]["step_s"]


def test_run_section_reports_the_losses_of_its_two_runs_bit_for_bit(dry_run, data_cache, tmp_path,
                                                                    one_thread):  # fmt: skip
    """The dry run's 3-step runs, trained again here (same config, same prepared corpus):
    the final validation losses are equal, not just close, and belong to the right recipe
    (thread count does not change them: measured 1 vs 2 threads, identical)."""
    run = dry_run[2]["run"]
    assert set(run) == {"bf16", "mxfp8", "gap_pct", "seconds"}
    base = {"data.source": "shakespeare", "data.cache_dir": str(data_cache),
            "run.progress": False, "run.device": "cpu", "model.n_layers": 1,
            "model.d_model": 64, "model.n_heads": 2, "model.n_kv_heads": 1,
            "model.ffn_hidden": 128, "data.vocab_size": 512, "run.steps": 3,
            "run.batch_size": 2, "run.seq_len": 32, "run.eval_batches": 1}  # fmt: skip
    for rec in ("bf16", "mxfp8"):
        assert set(run[rec]) == {"final_val_loss", "tokens_per_s"}
        assert _positive(run[rec]["tokens_per_s"])
        res = train(load_config(None, {**base, "recipe.name": rec, "run.out": str(tmp_path / rec)}))
        assert run[rec]["final_val_loss"] == res.final_val_loss, rec
    assert run["bf16"]["final_val_loss"] != run["mxfp8"]["final_val_loss"]
    gap = 100 * (run["mxfp8"]["final_val_loss"] / run["bf16"]["final_val_loss"] - 1)
    assert run["gap_pct"] == gap
