"""SIGTERM / SIGINT: finish the step, checkpoint, exit 143 / 130, resume bit-identically; a
second signal aborts at once. And kill -9 at random moments (scripts/kill_harness.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxfp8 import checkpoint as ckpt
from mxfp8.config.train_config import load_config
from mxfp8.train import golden
from mxfp8.train.loop import train
from mxfp8.train.preempt import Aborted, stop_on_signals
from mxfp8.train.runlog import read_metrics
from run_helpers import ROOT, exact, kill_harness


def test_first_signal_sets_the_flag_and_a_second_aborts():
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop and stop.name == "SIGTERM" and stop.exit_code == 143
        with pytest.raises(Aborted) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def _start(out: Path, cache: Path, steps: int, resume: bool = False) -> subprocess.Popen:
    args = [a for k, v in golden.OVERRIDES.items() if k != "run.steps" for a in (f"--{k}", str(v))]
    cmd = [sys.executable, "-m", "mxfp8.cli.main", "train", "--no-report", *args,
           "--steps", str(steps), "--out", str(out), "--data.cache_dir", str(cache),
           "--run.ckpt_every", "0"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([*cmd, *(["--resume"] if resume else [])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_rows(out: Path, n: int, proc: subprocess.Popen, limit: float = 120.0) -> None:
    t0 = time.monotonic()
    while len(read_metrics(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < limit, "the run did not start in time"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_is_bit_identical(sig, code, tmp_path, data_cache,
                                                        one_thread):  # fmt: skip
    steps = 400  # far more than run before the signal lands: the stop must come from it
    proc = _start(tmp_path / "run", data_cache, steps)
    _wait_for_rows(tmp_path / "run", 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"stopped by {signal.Signals(sig).name} after step" in out
    assert f"mxfp8 train --resume --out {tmp_path / 'run'}" in out
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    stopped = rows[-1]["step"]
    assert latest is not None and latest.name == ckpt.step_dir_name(stopped)
    assert 3 <= stopped < steps
    assert not (tmp_path / "run" / "summary.json").exists()
    # an uninterrupted run of the same length as what ran, compared row by row, then the
    # resumed run continues exactly: checked on the next rows against a longer reference
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "run.ckpt_every": 0,
            "run.steps": steps, "run.stop_after": stopped + 3}  # fmt: skip
    train(load_config(None, {**over, "run.out": str(tmp_path / "ref")}))
    resumed = _start(tmp_path / "run", data_cache, steps, resume=True)
    _wait_for_rows(tmp_path / "run", stopped + 3, resumed)
    resumed.send_signal(signal.SIGTERM)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 143, err
    ref = exact(read_metrics(tmp_path / "ref"))
    got = exact(read_metrics(tmp_path / "run"))
    assert got[: len(ref)] == ref and len(got) >= len(ref)


def test_kill_9_harness_a_few_kills(tmp_path):
    """The fast version of the harness: 3 kills (the slow test runs 30)."""
    tally = kill_harness().run_harness(3, seed=1, steps=8, workdir=tmp_path, say=lambda _: None)
    assert tally.ok(3), tally


@pytest.mark.slow
def test_kill_9_harness_30_kills(tmp_path):
    tally = kill_harness().run_harness(30, seed=0, steps=24, workdir=tmp_path, say=print)
    assert tally.landed >= 30
    assert tally.ok(30), tally
