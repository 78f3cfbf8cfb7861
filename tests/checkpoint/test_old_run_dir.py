"""A run directory written before the package was split into floors (0.1.0; the fixture's
README says how it was made) still loads and resumes, and the resumed run is the run the
current code trains from scratch: bit for bit on a machine like the one that wrote it (its
``.environment.json``, as the golden curves decide it), within the golden curves' tolerance
elsewhere (bf16 GEMMs round differently on other CPUs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mxfp8 import checkpoint as ckpt
from mxfp8.cli.main import main
from mxfp8.config.train_config import load_config
from mxfp8.train import golden
from mxfp8.train.loop import train
from mxfp8.train.runlog import read_metrics
from run_helpers import exact

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "run_before_split"
MADE_ON = json.loads(FIXTURE.with_name(FIXTURE.name + ".environment.json").read_text())


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Compares training numbers: one torch thread (tests/conftest.py)."""


def test_the_old_config_loads_as_it_was_written():
    cfg = load_config(FIXTURE / "config.toml")
    assert cfg.recipe.name == "mxfp8" and cfg.model.build().d_model == 32
    assert cfg.run.steps == 4 and cfg.run.resume is False and cfg.data.vocab_size == 512
    state = ckpt.load_state(FIXTURE / "checkpoints/step_0000002")  # verified, weights-only
    assert state["step"] == 2 and "hooks" not in state  # before hooks carried state


def test_the_old_run_resumes_to_what_the_current_code_trains(tmp_path, data_cache, caplog):
    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    args = ["train", "--resume", "--out", str(run), "--data.cache_dir", str(data_cache)]
    assert main(args) == 0
    assert "predates checkpointed divergence state" in caplog.text  # said, not silent
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    # the same config from step 0 with today's code
    fresh = load_config(FIXTURE / "config.toml", {"run.out": str(tmp_path / "new"),
                                                  "run.stop_after": 0,
                                                  "data.cache_dir": str(data_cache)})  # fmt: skip
    train(fresh)
    old, new = exact(read_metrics(run)), exact(read_metrics(tmp_path / "new"))
    env = golden.environment()
    if all(MADE_ON.get(k) == env.get(k) for k in golden.ENV_KEYS):
        assert old == new
        return
    assert [m["step"] for m in old] == [m["step"] for m in new] == [1, 2, 3, 4]
    for a, b in zip(old, new, strict=True):
        assert a["lr"] == b["lr"] and a.keys() == b.keys()
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= golden.TOLERANCE[key], (a["step"], key)
