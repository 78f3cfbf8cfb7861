"""scripts/full_split_gaps.py: paired gaps from the whole-split losses of ``mxfp8 eval``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "full_split_gaps.py"


def _write(cmp: Path, recipe: str, seed: int, loss: float) -> None:
    d = cmp / recipe / f"seed{seed}"
    d.mkdir(parents=True)
    # a task-only entry (compare --eval-tasks) first: only entries with a loss count
    evals = [{"source": "s", "tasks": {"cloze": {}}}, {"source": "s", "loss": loss}]
    (d / "eval.json").write_text(json.dumps({"evaluations": evals}))


def test_gaps_are_paired_seed_by_seed_with_a_t_interval(tmp_path):
    bf16 = {0: 4.0, 1: 4.5, 2: 3.5}  # the seeds differ far more than the gaps do
    for k, v in bf16.items():
        _write(tmp_path, "bf16", k, v)
        _write(tmp_path, "mxfp8", k, v * (1 + (k + 1) / 100))  # +1 %, +2 %, +3 %
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    line = next(row for row in out.splitlines() if row.startswith("mxfp8 "))
    # mean 2, std 1, t(0.975, 2 df) = 4.303: 2 +- 4.303 / sqrt(3) = [-0.48, +4.48]
    assert "+2.00 %" in line and "[-0.48 %, +4.48 %]" in line
    assert "indistinguishable from bf16" in line and "0: +1.00, 1: +2.00, 2: +3.00" in line
    assert "reference" in next(r for r in out.splitlines() if r.startswith("bf16 "))


def test_no_bf16_run_is_an_error(tmp_path):
    _write(tmp_path, "mxfp8", 0, 4.0)
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode != 0 and "no bf16 run" in r.stderr
