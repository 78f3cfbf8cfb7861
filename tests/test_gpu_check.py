"""The prepared GPU check runs end to end on CPU at tiny sizes (``--cpu-dry-run``), so the
script is known to work before it first meets a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_completes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run",
                          "--json", str(out)], capture_output=True, text=True, env=env,
                         timeout=480, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry_run"] is True
    for section in ("tests", "quantize", "linear", "train_step", "run"):
        assert "error" not in results[section], (section, results[section])
    assert results["quantize"]["inductor_bfloat16_gbs"] > 0
    assert results["quantize"]["triton_float32_gbs"] > 0  # the Triton kernel ran too
    assert results["linear"]["64x64x64"]["ratio"] > 0
    assert results["linear"]["64x64x64"]["ratio_mxfp8-triton"] > 0  # the layer on Triton
    assert results["train_step"]["tiny"]["mxfp8"]["tokens_per_s"] > 0
    run = results["run"]
    assert run["bf16"]["final_val_loss"] > 0 and run["mxfp8"]["final_val_loss"] > 0
    assert abs(run["gap_pct"]) < 50
