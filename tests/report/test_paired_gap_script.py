"""scripts/paired_gap.py: the paired gap of two run sets against a hand computation, only over
the seeds both finished."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "paired_gap.py"


def _script():
    spec = importlib.util.spec_from_file_location("paired_gap", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(root: Path, losses: dict[int, float | None]) -> Path:
    for seed, loss in losses.items():
        d = root / f"seed{seed}"
        d.mkdir(parents=True)
        if loss is not None:  # None: a run that has not finished (no summary)
            (d / "summary.json").write_text(json.dumps({"final_val_loss": loss}))
    return root


def test_gaps_mean_and_interval_by_hand(tmp_path, capsys):
    runs = _runs(tmp_path / "a", {0: 4.04, 1: 3.96, 2: 4.02, 3: None})
    ref = _runs(tmp_path / "b", {0: 4.0, 1: 4.0, 2: 4.0, 3: 4.1, 5: 4.0})
    assert _script().main([str(runs), str(ref), "--margin", "1"]) == 0
    out = capsys.readouterr().out
    gaps = [1.0, -1.0, 0.5]  # (4.04 - 4) / 4, ... in %
    m = sum(gaps) / 3
    sd = math.sqrt(sum((g - m) ** 2 for g in gaps) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert f"mean gap {m:+.2f} %, std {sd:.2f} %" in out
    assert f"95 % CI [{m - half:+.2f}, {m + half:+.2f}] % over 3 seeds" in out
    assert "   3 " not in out and "   5 " not in out  # only the seeds both finished
    half90 = 2.919985580355516 * sd / math.sqrt(3)  # t(0.95, 2): the TOST's interval
    assert f"[{m - half90:+.2f}, {m + half90:+.2f}]" in out and "undecided" in out


def test_no_common_seed(tmp_path, capsys):
    runs = _runs(tmp_path / "a", {0: 4.0})
    ref = _runs(tmp_path / "b", {1: 4.0})
    assert _script().main([str(runs), str(ref)]) == 1
    assert "no seed has a finished run in both" in capsys.readouterr().out
