"""`mxfp8 train`: generated --help, override errors, and a stop-then-resume run."""

from __future__ import annotations

import random

import pytest

from mxfp8.cli.main import main
from mxfp8.config.train_config import config_keys
from mxfp8.train.runlog import TIMING_KEYS, read_metrics


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section, entries in config_keys().items():
        for name, *_ in entries:
            assert f"--{section}.{name}" in out
    for flag in ("--recipe", "--model", "--data", "--steps", "--out", "--seed", "--resume",
                 "--config", "--stop-after"):  # fmt: skip
        assert f"  {flag} " in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim.lrr", "1"], "did you mean --optim.lr?"),
        (["--optim.lr", "x"], "invalid value 'x' for optim.lr"),
        (["--trainer.x", "1"], "SECTION one of"),
        (["--resume"], "--resume needs --out"),
    ],
)
def test_bad_options_fail_with_a_clear_message(argv, message, capsys):
    try:
        code = main(["train", *argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = ["the", "king", "queen", "sword", "night", "love", "death", "crown", "lord", "fair"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def test_stop_after_then_resume_matches_an_uninterrupted_run(tmp_path, corpus, capsys):
    common = [
        "train", "--recipe", "mxfp8", "--data", str(corpus), "--steps", "6", "--seed", "3",
        "--data.vocab_size", "300", "--data.cache_dir", str(tmp_path / "cache"),
        "--model.n_layers", "1", "--model.d_model", "64", "--model.n_heads", "2",
        "--model.n_kv_heads", "1", "--model.ffn_hidden", "128", "--run.batch_size", "2",
        "--run.seq_len", "32", "--run.log_every", "1", "--run.eval_batches", "1",
        "--run.progress", "false", "--run.compile_quantize", "false", "--no-report",
    ]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    out = capsys.readouterr().out
    assert "final validation perplexity:" in out and f"run directory: {tmp_path / 'full'}" in out
    assert main([*common, "--out", str(tmp_path / "part"), "--stop-after", "2"]) == 0
    assert "stopped after step 2 of 6" in capsys.readouterr().out
    # the resumed job gives only --out: the rest comes from the run's saved config.toml
    assert main(["train", "--resume", "--out", str(tmp_path / "part"), "--no-report"]) == 0
    assert "final validation perplexity:" in capsys.readouterr().out

    def exact(run):
        return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in read_metrics(run)]

    assert exact(tmp_path / "part") == exact(tmp_path / "full")
    assert len(exact(tmp_path / "full")) == 6
