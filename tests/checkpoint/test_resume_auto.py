"""``--resume auto`` (issue 22): one command line for every launch of a job, as a scheduler
requeues it. It starts the run when ``--out`` holds none (or only what a start-up crash left),
continues it from its newest intact checkpoint, says a finished run is complete, and refuses a
directory that holds another run, naming what differs."""

from __future__ import annotations

import json

import pytest

from mxfp8 import checkpoint as ckpt
from mxfp8.cli.main import main
from mxfp8.config.fields import ConfigError
from mxfp8.config.train_config import TrainConfig, load_config
from mxfp8.train.golden import torch_threads
from mxfp8.train.loop import train
from mxfp8.train.runlog import read_metrics
from run_helpers import cli_args, exact, kill_harness, small, tree_digest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here compares training numbers: one torch thread (tests/conftest.py)."""


STEPS = {"run.steps": 4}


def auto(out, cache, capsys, **over) -> tuple[int, str, str]:
    """``mxfp8 train ... --out OUT --resume auto`` with the small run's full command line."""
    capsys.readouterr()
    code = main(["train", "--no-report", *cli_args(small(out, cache, **STEPS, **over)),
                 "--resume", "auto"])  # fmt: skip
    got = capsys.readouterr()
    return code, got.out, got.err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """The uninterrupted run every case must reproduce, bit for bit."""
    out = tmp_path_factory.mktemp("auto") / "reference"
    with torch_threads(1):
        train(load_config(None, small(out, data_cache, **STEPS)))
    return exact(read_metrics(out))


def test_the_config_field_takes_true_false_and_auto():
    for value, want in (("auto", "auto"), ("true", True), ("false", False), (True, True)):
        assert load_config(None, {"run.resume": value}).run.resume == want
    cfg = load_config(None, {"run.resume": "auto"})
    assert 'resume = "auto"' in cfg.to_toml()
    assert TrainConfig.from_toml(cfg.to_toml()).run.resume == "auto"
    for old in ("false", "true"):  # config.toml files written before "auto" existed
        assert TrainConfig.from_toml(f"[run]\nresume = {old}\n").run.resume is (old == "true")
    for bad in ("maybe", "yes please", 3):
        with pytest.raises(ConfigError, match=r"run\.resume .*auto"):
            load_config(None, {"run.resume": bad})


def test_bad_resume_values_on_the_command_line(tmp_path, capsys):
    for argv, message in (
        (["--resume", "sometimes", "--out", str(tmp_path)], "--resume"),
        (["--resume", "auto"], "--resume auto needs --out"),
        (["--run.resume", "maybe", "--out", str(tmp_path)], "run.resume"),
    ):
        try:
            code = main(["train", *argv])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_directory_starts_then_the_same_command_says_complete(
    tmp_path, data_cache, capsys, reference
):
    out = tmp_path / "run"
    code, _, err = auto(out, data_cache, capsys)
    assert code == 0, err
    assert exact(read_metrics(out)) == reference
    before = tree_digest(out)
    code, text, err = auto(out, data_cache, capsys)  # requeued after it finished
    assert code == 0 and "already complete (4 steps)" in text, err
    assert tree_digest(out) == before


def test_an_existing_empty_directory_starts_the_run(tmp_path, data_cache, capsys, reference):
    (tmp_path / "run").mkdir()
    assert auto(tmp_path / "run", data_cache, capsys)[0] == 0
    assert exact(read_metrics(tmp_path / "run")) == reference


def _config_toml(out, cache) -> str:
    return load_config(None, small(out, cache, **STEPS)).to_toml()


@pytest.mark.parametrize("debris", ["no-config", "torn-config", "config-and-metrics"])
def test_start_up_debris_is_cleared_and_the_run_starts(
    debris, tmp_path, data_cache, capsys, reference
):
    """What a process killed during start-up leaves (loop._prepare_dir, an atomic write of
    config.toml, the first steps before any checkpoint, a checkpoint being written)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".write-test-999999999").write_bytes(b"")
    text = _config_toml(out, data_cache)
    (out / ".config.toml.tmp").write_text(text[: len(text) // 2])
    if debris == "torn-config":
        (out / "config.toml").write_text(text[: text.index('name = "') + 9])
    if debris == "config-and-metrics":
        (out / "config.toml").write_text(text)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + '\n{"st')
        (out / "checkpoints/.tmp-step_0000001-999999999").mkdir(parents=True)
    code, _, err = auto(out, data_cache, capsys)
    assert code == 0, err
    assert exact(read_metrics(out)) == reference
    assert not (out / "checkpoints/.tmp-step_0000001-999999999").exists()


def test_a_checkpoint_of_this_run_is_continued(tmp_path, data_cache, capsys, reference):
    out = tmp_path / "run"
    code, text, err = auto(out, data_cache, capsys, **{"run.stop_after": 2})
    assert code == 0 and "after step 2 of 4" in text, err
    first = read_metrics(out)  # with their timings: a run started again rewrites them
    code, text, err = auto(out, data_cache, capsys)  # the job's requeue: no --stop-after
    assert code == 0, err
    assert read_metrics(out)[:2] == first[:2]
    assert exact(read_metrics(out)) == reference


@pytest.mark.parametrize("state", ["stopped", "complete", "checkpoint-only", "no-checkpoint"])
def test_a_directory_of_another_run_is_refused(state, tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    other = {"run.seed": 7, **({"run.stop_after": 2} if state != "complete" else {})}
    if state == "no-checkpoint":
        out.mkdir()
        (out / "config.toml").write_text(
            load_config(None, small(out, data_cache, **STEPS, **other)).to_toml()
        )
    else:
        assert auto(out, data_cache, capsys, **other)[0] == 0
    if state == "checkpoint-only":  # the checkpoint carries its config
        (out / "config.toml").unlink()
        assert ckpt.list_checkpoints(out)
    before = tree_digest(out)
    code, _, err = auto(out, data_cache, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "another run" in err and "run.seed: 7 -> 1234" in err, err
    assert tree_digest(out) == before


def test_plain_resume_keeps_its_meaning(tmp_path, data_cache, capsys):
    """--resume alone: the saved config is the base, and a directory without a run is an
    error (a typo in --out must not start a new run)."""
    (tmp_path / "empty").mkdir()
    code = main(["train", "--resume", "--out", str(tmp_path / "empty")])
    assert code == 2 and "holds no run" in capsys.readouterr().err


def test_a_run_started_from_init_from_is_recognised(tmp_path):
    """With run.init_from the start takes the model shape and the tokenizer from that
    directory and writes them into config.toml; the same command, which leaves them to it,
    is the same run (and any other change is still refused)."""
    from mxfp8.checkpoint.resume import ResumeError, find_start

    src = str(tmp_path / "llama")
    command = {"run.init_from": src, "run.steps": 4, "run.resume": "auto"}
    written = {**command, "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2,
               "model.vocab_size": 512, "data.tokenizer": f"{src}/tokenizer.json"}  # fmt: skip
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text(load_config(None, written).to_toml())
    start = find_start(load_config(None, command), out)
    assert start.checkpoint is None and start.fresh_restart  # never checkpointed: step 0
    with pytest.raises(ResumeError, match=r"model\.n_layers: 2 -> 3"):
        find_start(load_config(None, {**command, "model.n_layers": 3}), out)
    with pytest.raises(ResumeError, match=r"model\.n_layers: 2 -> \(unset\)"):  # not derived
        find_start(load_config(None, {**command, "run.init_from": str(tmp_path / "other")}), out)


@pytest.mark.slow
def test_kill_9_during_start_up_then_the_same_command(tmp_path):
    """scripts/kill_harness.py with every kill drawn within the start-up (before the first
    metrics row: mostly before config.toml exists), each followed by the job's one command
    again: every kill resumable, the chain bit-identical to the uninterrupted run. About a
    minute (two reference runs, then the chain); `make test` runs the harness's 3-kill test
    (tests/train/test_preempt.py, 30 % of its kills in start-up) and the in-process cases
    above."""

    tally = kill_harness().run_harness(2, seed=5, steps=3, workdir=tmp_path, say=lambda _: None,
                                   startup_share=1.0)  # fmt: skip
    assert tally.ok(2), tally
    assert tally.startup >= 1, tally.phases


def test_damaged_checkpoints_are_skipped_and_none_intact_is_an_error(
    tmp_path, data_cache, capsys, reference
):
    out = tmp_path / "run"
    every = {"run.ckpt_every": 1, "run.keep_last": 3}  # observation fields: may differ
    assert auto(out, data_cache, capsys, **every, **{"run.stop_after": 2})[0] == 0
    files = [out / f"checkpoints/step_000000{k}/model.safetensors" for k in (1, 2)]
    blobs = [f.read_bytes() for f in files]
    for f, blob in zip(files, blobs, strict=True):
        f.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    code, _, err = auto(out, data_cache, capsys, **every)
    assert code == 2 and "--resume auto: no intact checkpoint in" in err, err
    files[0].write_bytes(blobs[0])  # step 1 intact again, step 2 still damaged
    code, _, err = auto(out, data_cache, capsys, **every)
    assert code == 0 and "skipping damaged checkpoint" in err and "step_0000002" in err, err
    assert exact(read_metrics(out)) == reference
