"""Kill a tiny training run with SIGKILL at random moments, requeue it, and check the result.

    python scripts/kill_harness.py --kills 30 [--seed 0] [--steps 24] [--startup-share 0.3]

What it proves: whatever moment ``kill -9`` lands (start-up, before or after ``config.toml``
is written, a step, an evaluation, the middle of a checkpoint write), the run directory still
holds a loadable latest checkpoint, its metrics agree with it, and the job's one command
line, ``mxfp8 train ... --out RUN --resume auto`` launched again as a scheduler requeues it,
carries the run to the same numbers, bit for bit, as a run that was never interrupted.

How: two uninterrupted reference runs first (the second, on a warm data cache, sets the kill
window: its wall time, and its start-up, the time until its first metrics row). Then chains:
the command is launched, killed after a random delay, the directory checked, the same command
launched again, killed again, ... until the kill budget is spent; the chain's last process
runs to the end and its metrics and final weights are compared with the reference. Delays are
drawn from the first instant: uniform over the whole window, or (a ``--startup-share`` of the
kills) uniform over the start-up alone, so that kills before any checkpoint or config.toml
exists are many. A kill "lands" when the process was still running. Each landed kill is
*resumable* when the next process either ran to completion or was itself still running when
it was killed (it did not fail). Exit status 0 iff every kill was resumable, every chain
bit-identical and every check after a kill passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TIMING_KEYS = ("tokens_per_s", "step_time_s", "peak_mem_mb")

# a small, quick run that still checkpoints every step (most of its time is start-up, steps
# and checkpoint writes: the moments a crash can hurt)
RUN_ARGS = [
    "--recipe", "mxfp8",
    "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "2",
    "--model.n_kv_heads", "1", "--model.ffn_hidden", "128",
    "--data.vocab_size", "512",
    "--run.batch_size", "4", "--run.seq_len", "32", "--run.seed", "1234",
    "--run.log_every", "1", "--run.eval_every", "8", "--run.eval_batches", "2",
    "--run.ckpt_every", "1", "--run.keep_last", "2",
    "--run.progress", "false", "--run.compile_quantize", "false",
]  # fmt: skip


# where a kill landed (phase_of_kill); the first three are start-up
PHASES = (
    "start-up, no config.toml in RUN",  # a chain's first process (or one before it) killed
    "start-up, before rewriting config.toml",  # a later process, before writing its own
    "start-up, config.toml written",  # before the process's first metrics row
    "step",
    "checkpoint",
)


@dataclass
class Tally:
    landed: int = 0
    resumable: int = 0
    checks_failed: list[str] = field(default_factory=list)
    chains: int = 0
    identical: int = 0
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def startup(self) -> int:
        return sum(self.phases.get(p, 0) for p in PHASES[:3])

    def ok(self, wanted: int) -> bool:
        return (
            self.landed >= wanted
            and self.resumable == self.landed
            and self.identical == self.chains
            and not self.checks_failed
        )


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _command(out: Path, cache: Path, steps: int) -> list[str]:
    """The job's one command line: every launch of a chain runs it unchanged."""
    cmd = [sys.executable, "-m", "mxfp8.cli.main", "train", "--no-report", *RUN_ARGS]
    return [*cmd, "--steps", str(steps), "--out", str(out), "--data.cache_dir", str(cache),
            "--resume", "auto"]  # fmt: skip


def _exact_rows(run_dir: Path) -> dict[int, dict]:
    from mxfp8.train.runlog import read_metrics

    rows = read_metrics(run_dir)
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows}


def _final_weights(run_dir: Path, steps: int):
    from safetensors.torch import load_file

    from mxfp8.checkpoint.write import step_dir_name

    return load_file(str(run_dir / "checkpoints" / step_dir_name(steps) / "model.safetensors"))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _leftovers(run_dir: Path) -> frozenset[str]:
    """Checkpoint directories being written, replaced or deleted (by a live or dead process)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return frozenset()
    return frozenset(
        p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-", ".del-"))
    )


def snapshot(run_dir: Path) -> dict[str, object]:
    """What a process finds at its launch (to tell what it wrote before it was killed)."""
    got: dict[str, object] = {n: _stamp(run_dir / n) for n in ("config.toml", "metrics.jsonl")}
    return {**got, "leftovers": _leftovers(run_dir)}


def phase_of_kill(run_dir: Path, before: dict[str, object]) -> str:
    """Where the kill landed, judged from what the killed process left (``before``: the
    directory at its launch): a checkpoint of its own being written or replaced (checkpoint);
    no metrics row of its own yet (start-up: RUN holding no config.toml at all, or the one
    an earlier process wrote, or its own: every launch writes it by an atomic rename);
    else (step)."""
    now = snapshot(run_dir)
    if now["leftovers"] - before["leftovers"]:
        return "checkpoint"
    if now["metrics.jsonl"] != before["metrics.jsonl"]:
        return "step"
    if now["config.toml"] is None:
        return PHASES[0]
    return PHASES[1] if now["config.toml"] == before["config.toml"] else PHASES[2]


def check_after_kill(run_dir: Path, reference: dict[int, dict]) -> str | None:
    """None when the killed run's directory is consistent; else what is wrong."""
    from mxfp8 import checkpoint as ckpt
    from mxfp8.checkpoint.resume import step_of

    if not (run_dir / "config.toml").is_file():  # killed during start-up: nothing to resume
        left = (run_dir / "metrics.jsonl").exists() or ckpt.list_checkpoints(run_dir)
        return "metrics or checkpoints without a config.toml" if left else None
    latest, skipped = ckpt.latest_intact_checkpoint(run_dir)
    if skipped:
        return f"damaged checkpoints after a kill: {skipped}"
    done = step_of(latest) if latest is not None else 0
    rows = _exact_rows(run_dir)
    for step in range(1, done + 1):
        if rows.get(step) != reference[step]:
            return f"metrics row of step {step} (<= checkpoint {done}) missing or different"
    bad = [s for s, r in rows.items() if r != reference.get(s)]
    return f"metrics rows {bad} differ from the reference" if bad else None


def _tail(err: bytes) -> str:
    return err.decode(errors="replace").strip()[-300:]


def _first_row_after(cmd: list[str], run_dir: Path) -> tuple[float, float]:
    """Run ``cmd`` to its end: (seconds until its first metrics row, seconds in all)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    first = None
    while proc.poll() is None:
        if first is None and (run_dir / "metrics.jsonl").is_file():
            first = time.perf_counter() - t0
        time.sleep(0.02)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed (exit {proc.returncode})")
    return first if first is not None else total, total


def run_harness(kills: int, seed: int, steps: int, workdir: Path, say=print,
                startup_share: float = 0.3) -> Tally:  # fmt: skip
    rng = random.Random(seed)
    cache = workdir / "cache"
    ref_dir = workdir / "reference"
    t0 = time.perf_counter()
    subprocess.run(_command(ref_dir, cache, steps), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # the second reference process meets a warm data cache, as every later process does
    ref_dir2 = workdir / "reference2"
    cold = time.perf_counter() - t0
    startup, window = _first_row_after(_command(ref_dir2, cache, steps), ref_dir2)
    say(f"reference runs: {cold:.1f} s cold, {window:.1f} s warm (first metrics row after "
        f"{startup:.1f} s); kills drawn over [0, {window:.1f}] s, or over [0, {startup:.1f}] s "
        f"for a share of {startup_share:.0%}")  # fmt: skip
    reference = _exact_rows(ref_dir)
    if _exact_rows(ref_dir2) != reference:
        raise SystemExit("two uninterrupted runs differ: the environment is not deterministic")
    ref_weights = _final_weights(ref_dir, steps)

    tally = Tally()
    while tally.landed < kills:
        tally.chains += 1
        run_dir = workdir / f"chain{tally.chains:03d}"
        after_kill = False
        while True:
            before = snapshot(run_dir)
            proc = subprocess.Popen(_command(run_dir, cache, steps), env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            if tally.landed >= kills:  # budget spent: let this one finish
                delay = None
            else:
                span = startup if rng.random() < startup_share else window
                delay = rng.uniform(0.0, span)
            try:
                _, err = proc.communicate(timeout=delay)
                landed = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                _, err = proc.communicate()
                landed = True
            if after_kill:  # this process continued after a kill: did it fail?
                failed = not landed and proc.returncode != 0
                tally.resumable += 0 if failed else 1
                if failed:
                    tally.checks_failed.append(
                        f"{run_dir.name}: resume failed ({proc.returncode}): {_tail(err)}"
                    )
                    break
            if landed:
                tally.landed += 1
                phase = phase_of_kill(run_dir, before)  # before the check: it cleans up
                tally.phases[phase] = tally.phases.get(phase, 0) + 1
                problem = check_after_kill(run_dir, reference)
                if problem:
                    tally.checks_failed.append(f"{run_dir.name} kill {tally.landed}: {problem}")
                say(f"kill {tally.landed:3d} after {delay:5.2f} s ({phase}) in {run_dir.name}: "
                    f"{problem or 'consistent'}")  # fmt: skip
                after_kill = True  # the requeue: the same command again
                continue
            if proc.returncode != 0:
                tally.checks_failed.append(f"{run_dir.name}: exit {proc.returncode}: {_tail(err)}")
                break
            same = _exact_rows(run_dir) == reference
            weights = _final_weights(run_dir, steps)
            same = (
                same
                and all(weights[k].equal(v) for k, v in ref_weights.items())
                and weights.keys() == ref_weights.keys()
            )
            tally.identical += int(same)
            say(f"{run_dir.name}: completed, {'bit-identical' if same else 'DIFFERENT'}")
            break
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=30, help="kills that must land (30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--steps", type=int, default=24, help="steps of the tiny run (24)")
    p.add_argument("--startup-share", type=float, default=0.3,
                   help="share of the kills drawn within the start-up alone (0.3)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mxfp8-kill-") as tmp:
        workdir = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        tally = run_harness(args.kills, args.seed, args.steps, workdir,
                            startup_share=args.startup_share)  # fmt: skip
        result = {
            "kills_landed": tally.landed,
            "resumable": tally.resumable,
            "chains": tally.chains,
            "bit_identical_chains": tally.identical,
            "kills_during_start_up": tally.startup,
            "kills_by_phase": tally.phases,
            "failed_checks": tally.checks_failed,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(result, indent=2))
        pct = 100.0 * tally.resumable / max(tally.landed, 1)
        print(f"{tally.landed} kills ({tally.startup} during start-up), {pct:.0f} % "
              f"resumable, {tally.identical}/{tally.chains} chains bit-identical to the "
              "uninterrupted run")  # fmt: skip
        return 0 if tally.ok(args.kills) else 1


if __name__ == "__main__":
    raise SystemExit(main())
