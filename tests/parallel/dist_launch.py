"""Launching small multi-process jobs from tests: torchrun (gloo, CPU) in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(nproc: int, args: list[str], *, timeout: float = 240, cwd: Path | None = None,
             env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:  # fmt: skip
    """Run ``torchrun --standalone --nproc-per-node nproc ARGS``; returns (result, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "--monitor-interval=0.5", *args]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)  # a test run under torchrun itself must not leak its own
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                         env=full_env)  # fmt: skip
    return res, time.perf_counter() - t0


def mxfp8(nproc: int, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """``torchrun ... -m mxfp8 ARGV`` (nproc > 0), or ``python -m mxfp8 ARGV`` (nproc 0);
    fails the test with the job's output when it does not exit 0."""
    if nproc:
        res, _ = torchrun(nproc, ["-m", "mxfp8", *argv], **kw)
    else:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        res = subprocess.run([sys.executable, "-m", "mxfp8", *argv], capture_output=True,
                             text=True, timeout=kw.get("timeout", 240), env=env)  # fmt: skip
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def worker(nproc: int, scenario: str, out: Path, *extra: str, **kw):
    """Run scenario ``scenario`` of dist_worker.py under torchrun; returns (result, seconds)."""
    return torchrun(nproc, [str(WORKER), scenario, str(out), *extra], **kw)


def per_rank(out: Path, nproc: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
