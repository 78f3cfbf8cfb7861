"""Resume in every case: finished runs, changed configs, bf16 moments, odd paths, compiled
quantizers, and the data identity check."""

from __future__ import annotations

import json

import pytest
import torch

from mxfp8 import checkpoint as ckpt
from mxfp8.checkpoint import write as ckpt_write  # what the writer looks its helpers up in
from mxfp8.checkpoint.resume import config_changes
from mxfp8.cli.main import main
from mxfp8.config.train_config import load_config
from mxfp8.train.loop import RunComplete, train
from mxfp8.train.runlog import read_metrics
from run_helpers import cli_args, exact, small, tree_digest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here compares training numbers: one torch thread (tests/conftest.py)."""


def _full_and_resumed(tmp_path, data_cache, over: dict) -> tuple[dict, dict]:
    """A 6-step run in ``full``, and the same run stopped after step 3 and resumed in
    ``part``: their metrics must be equal, bit for bit. Returns both runs' step-6 states."""
    train(load_config(None, small(tmp_path / "full", data_cache, **over)))
    train(load_config(None, small(tmp_path / "part", data_cache, **over, **{"run.stop_after": 3})))
    resumed = load_config(
        None, small(tmp_path / "part", data_cache, **over, **{"run.resume": True})
    )
    train(resumed)
    assert exact(read_metrics(tmp_path / "part")) == exact(read_metrics(tmp_path / "full"))
    return tuple(ckpt.load_state(tmp_path / d / "checkpoints/step_0000006")
                 for d in ("full", "part"))  # fmt: skip


def test_bf16_states_resume_is_bit_identical_and_stays_bf16(tmp_path, data_cache):
    over = {"run.steps": 6, "optim.bf16_states": True}
    a, b = _full_and_resumed(tmp_path, data_cache, over)
    for p, q in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        for key in ("exp_avg", "exp_avg_sq"):
            assert q[key].dtype == torch.bfloat16, "the moments must stay bf16 after a resume"
            assert torch.equal(p[key], q[key])


def test_fp8_states_resume_is_bit_identical_and_stays_compact(tmp_path, data_cache):
    over = {"run.steps": 6, "optim.states": "fp8"}
    a, b = _full_and_resumed(tmp_path, data_cache, over)
    n_8bit = 0
    for p, q in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert p.keys() == q.keys()
        if "exp_avg_codes" in q:  # the checkpoint holds m's codes and scales and a bf16 v
            n_8bit += 1
            assert "exp_avg" not in q and q["exp_avg_sq"].dtype == torch.bfloat16
            assert q["exp_avg_codes"].dtype == q["exp_avg_scale"].dtype == torch.uint8
        for key in p:
            assert torch.equal(p[key], q[key]), key
    assert n_8bit >= 4, "the model's matrices must have 8-bit moments"


def test_bf16_grads_with_fp8_states_resume_is_bit_identical(tmp_path, data_cache):
    over = {"run.steps": 6, "optim.grad_dtype": "bf16", "optim.states": "fp8",
            "run.grad_accum": 2}  # fmt: skip
    _full_and_resumed(tmp_path, data_cache, over)


def test_lean_with_mx_grads_and_accumulation_resumes_bit_identically(tmp_path, data_cache):
    over = {"run.steps": 6, "run.memory": "lean", "optim.grad_dtype": "mx",
            "run.grad_accum": 2, "recipe.name": "mxfp8"}  # fmt: skip
    _full_and_resumed(tmp_path, data_cache, over)


def test_optimizer_load_keeps_bf16_moments():
    from mxfp8.train.optim import AdamWBF16States

    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = AdamWBF16States([p], lr=1e-2)
    p.grad = torch.randn(4, 4)
    opt.step()
    fresh = AdamWBF16States([p], lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, data_cache, capsys):
    over = small(tmp_path / "run", data_cache, **{"run.steps": 3})
    assert main(["train", "--no-report", *cli_args(over)]) == 0
    first = capsys.readouterr().out
    assert "tokens/s steady state" in first and "wall time" in first
    before = tree_digest(tmp_path / "run")
    code = main(["train", "--resume", "--out", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert code == 0
    assert "already complete (3 steps)" in out.out
    assert "Traceback" not in out.err
    assert tree_digest(tmp_path / "run") == before
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["final_val_loss"] is not None and summary["diverged"] is False


def test_more_steps_on_a_finished_run_is_a_clear_error(tmp_path, data_cache, capsys):
    over = small(tmp_path / "run", data_cache, **{"run.steps": 3})
    assert main(["train", "--no-report", *cli_args(over)]) == 0
    before = tree_digest(tmp_path / "run")
    capsys.readouterr()
    code = main(["train", "--resume", "--out", str(tmp_path / "run"), "--steps", "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "is complete (3 steps) and cannot be continued to run.steps=5" in err
    assert tree_digest(tmp_path / "run") == before


def test_summary_lost_in_a_crash_comes_back_from_the_final_checkpoint(tmp_path, data_cache):
    cfg = load_config(None, small(tmp_path / "run", data_cache, **{"run.steps": 3}))
    first = train(cfg)
    (tmp_path / "run/summary.json").unlink()  # killed between the final checkpoint and it
    with pytest.raises(RunComplete):
        train(
            load_config(
                None, small(tmp_path / "run", data_cache, **{"run.steps": 3, "run.resume": True})
            )
        )
    restored = json.loads((tmp_path / "run/summary.json").read_text())
    assert restored == json.loads(json.dumps(first.summary))


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"run.batch_size": 2}, "run.batch_size: 4 -> 2"),
        ({"run.seq_len": 16}, "run.seq_len: 32 -> 16"),
        ({"run.grad_accum": 2}, "run.grad_accum: 1 -> 2"),
        ({"data.source": "kjv"}, "data.source: 'shakespeare' -> 'kjv'"),
        ({"model.n_layers": 1}, "model.n_layers: 2 -> 1"),
        ({"recipe.name": "mxfp8"}, "recipe.name: 'bf16' -> 'mxfp8'"),
        ({"run.seed": 7}, "run.seed: 1234 -> 7"),
        ({"optim.lr": 1e-3}, "optim.lr: 0.003 -> 0.001"),
    ],
)
def test_resume_with_a_changed_config_is_refused(change, shown, tmp_path, data_cache, capsys):
    over = small(tmp_path / "run", data_cache, **{"run.steps": 4, "run.stop_after": 2})
    assert main(["train", "--no-report", *cli_args(over)]) == 0
    before = tree_digest(tmp_path / "run")
    capsys.readouterr()
    code = main(["train", "--resume", "--out", str(tmp_path / "run"), *cli_args(change)])
    err = capsys.readouterr().err
    assert code == 2
    assert shown in err, err
    assert "Traceback" not in err
    assert tree_digest(tmp_path / "run") == before


def test_every_changed_field_is_listed():
    a = load_config(None, {"run.batch_size": 4, "run.seq_len": 32})
    b = load_config(None, {"run.batch_size": 2, "run.seq_len": 16, "run.log_every": 1})
    assert config_changes(a, b) == [("run.batch_size", 4, 2), ("run.seq_len", 32, 16)]


def test_resumable_fields_may_change_and_the_run_stays_exact(tmp_path, data_cache):
    base = {"run.steps": 6, "run.eval_every": 3}
    train(load_config(None, small(tmp_path / "full", data_cache, **base)))
    train(load_config(None, small(tmp_path / "part", data_cache, **base, **{"run.stop_after": 2})))
    changed = {"run.resume": True, "run.log_every": 2, "run.ckpt_every": 1, "run.keep_last": 3}
    train(load_config(None, small(tmp_path / "part", data_cache, **base, **changed)))
    full = {m["step"]: m for m in exact(read_metrics(tmp_path / "full"))}
    for row in exact(read_metrics(tmp_path / "part")):
        assert row == full[row["step"]]


def test_out_with_characters_outside_the_bmp_resumes(tmp_path, data_cache):
    out = tmp_path / "run-\N{ROCKET}-\N{GRINNING FACE}"
    over = {"run.steps": 4}
    train(load_config(None, small(out, data_cache, **over, **{"run.stop_after": 2})))
    saved = load_config(out / "config.toml")  # readable by tomllib again
    assert saved.run.out == str(out)
    result = train(load_config(None, small(out, data_cache, **over, **{"run.resume": True})))
    assert result.completed


def test_resume_of_a_directory_without_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["train", "--resume", "--out", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and "holds no run" in err and "Traceback" not in err
    assert list((tmp_path / "empty").iterdir()) == []


def test_unwritable_out_is_a_clear_error(tmp_path, data_cache, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    over = small(blocker / "run", data_cache, **{"run.steps": 1})
    code = main(["train", "--no-report", *cli_args(over)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write the run directory" in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory\n"


def test_a_tokenizer_that_does_not_match_is_refused(tmp_path, data_cache, capsys):
    """Same config, same tokenizer path, other tokenizer content: the ids mean other words."""
    from mxfp8.data.prepare import DataConfig, prepare_data

    def prepared(vocab: int):
        return prepare_data(DataConfig(source="shakespeare", vocab_size=vocab,
                                       cache_dir=str(data_cache)))  # fmt: skip

    mine, other = prepared(512), prepared(300)
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes((mine.path / "tokenizer.json").read_bytes())
    over = small(tmp_path / "run", data_cache, **{"run.steps": 4, "data.tokenizer": str(tok)})
    assert main(["train", "--no-report", *cli_args(over), "--stop-after", "2"]) == 0
    before = tree_digest(tmp_path / "run")
    tok.write_bytes((other.path / "tokenizer.json").read_bytes())  # swapped behind its back
    capsys.readouterr()
    code = main(["train", "--resume", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "data or tokenizer differ" in err and "tokenizer_sha256" in err, err
    assert tree_digest(tmp_path / "run") == before


def test_compiled_quantizers_train_and_resume_exactly(tmp_path, data_cache):
    """The default training path (run.compile_quantize = true) end to end, with a resume."""
    over = {"recipe.name": "mxfp8", "run.steps": 4, "run.compile_quantize": True}
    full = train(load_config(None, small(tmp_path / "full", data_cache, **over)))
    train(load_config(None, small(tmp_path / "part", data_cache, **over, **{"run.stop_after": 2})))
    train(load_config(None, small(tmp_path / "part", data_cache, **over, **{"run.resume": True})))
    assert full.completed
    assert exact(read_metrics(tmp_path / "part")) == exact(read_metrics(tmp_path / "full"))
    eager_over = {**over, "run.compile_quantize": False}
    eager = train(load_config(None, small(tmp_path / "eager", data_cache, **eager_over)))
    assert exact(read_metrics(tmp_path / "eager")) == exact(read_metrics(tmp_path / "full"))
    assert eager.final_val_loss == full.final_val_loss


def test_summary_reports_steady_state_throughput_and_wall_time(tmp_path, data_cache):
    result = train(load_config(None, small(tmp_path / "run", data_cache, **{"run.steps": 6})))
    rows = read_metrics(tmp_path / "run")
    summary = result.summary
    warm = summary["warmup_steps_excluded"]
    steady_rows = [m for m in rows if m["step"] > warm]
    tokens = sum(m["tokens"] - p["tokens"] for p, m in zip(rows, rows[1:], strict=False)
                 if m["step"] > warm)  # fmt: skip
    expected = tokens / sum(m["step_time_s"] for m in steady_rows)
    assert summary["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
    total = sum(m["step_time_s"] for m in rows)
    assert summary["tokens_per_s_with_warmup"] == pytest.approx(rows[-1]["tokens"] / total)
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, data_cache, capsys):
    over = {"run.steps": 6, "run.ckpt_every": 1, "run.keep_last": 3}
    train(load_config(None, small(tmp_path / "full", data_cache, **over)))
    train(load_config(None, small(tmp_path / "part", data_cache, **over, **{"run.stop_after": 4})))
    damaged = tmp_path / "part/checkpoints/step_0000004/model.safetensors"
    blob = bytearray(damaged.read_bytes())
    blob[-1] ^= 0xFF  # one flipped byte: same size, other content
    damaged.write_bytes(bytes(blob))
    capsys.readouterr()
    resumed = train(load_config(None, small(tmp_path / "part", data_cache, **over,
                                            **{"run.resume": True})))  # fmt: skip
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "step_0000004" in err and "checksum" in err
    assert resumed.completed
    assert exact(read_metrics(tmp_path / "part")) == exact(read_metrics(tmp_path / "full"))


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, data_cache, capsys,
                                                               monkeypatch):  # fmt: skip
    import errno

    over = small(tmp_path / "run", data_cache, **{"run.steps": 6, "run.ckpt_every": 2})
    real_save = ckpt_write.save_model

    def save_model(model, path, *args, **kwargs):
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_write, "save_model", save_model)
    code = main(["train", "--no-report", *cli_args(over)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "could not write checkpoint step_0000004" in err and "no space left" in err.lower()
    latest, skipped = ckpt.latest_intact_checkpoint(tmp_path / "run")
    assert latest.name == "step_0000002" and not skipped
    assert not [p for p in (tmp_path / "run/checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(ckpt_write, "save_model", real_save)  # space freed: the run continues
    assert main(["train", "--resume", "--no-report", "--out", str(tmp_path / "run")]) == 0


ADAPTIVE = {"recipe.name": "mxfp8-adaptive"}


@pytest.mark.parametrize(
    "change, shown",
    [
        (
            {"run.telemetry_every": 5},
            "run.telemetry_every: 0 (every 25 steps: recipe.adaptive_every) -> 5",
        ),  # fmt: skip
        ({"divergence.sigmas": 3.0}, "divergence.sigmas: 6.0 -> 3.0"),
        ({"divergence.warmup_steps": 2}, "divergence.warmup_steps: 20 -> 2"),
        ({"divergence.top_layers": 1}, "divergence.top_layers: 5 -> 1"),
    ],
)
def test_adaptive_runs_refuse_what_decides_their_precision_switches(change, shown):
    """Telemetry cadence and divergence thresholds pick the layers an adaptive recipe
    switches to bf16: changing them on resume would compute another run (issue 22)."""
    from mxfp8.checkpoint.resume import ResumeError, check_changes

    saved = load_config(None, ADAPTIVE)
    new = load_config(None, {**ADAPTIVE, **change})
    assert [c[0] for c in config_changes(saved, new)] == list(change)
    with pytest.raises(ResumeError) as e:
        check_changes(saved, new, "RUN")
    assert shown in str(e.value) and "adaptive" in str(e.value)
    # the same change on a recipe that is not adaptive observes the run, nothing more
    plain = {"recipe.name": "mxfp8"}
    assert config_changes(load_config(None, plain), load_config(None, {**plain, **change})) == []


def test_adaptive_telemetry_cadence_is_compared_as_it_runs():
    """run.telemetry_every = 0 means every recipe.adaptive_every steps: 0 -> 25 is no change,
    and the recipe's own adaptive thresholds were guarded already (recipe fields)."""
    saved = load_config(None, ADAPTIVE)
    assert config_changes(saved, load_config(None, {**ADAPTIVE, "run.telemetry_every": 25})) == []
    for change, fields in (
        ({"recipe.adaptive_min_sqnr_db": 25.0}, ["recipe.adaptive_min_sqnr_db"]),
        ({"recipe.adaptive_on_divergence": False}, ["recipe.adaptive_on_divergence"]),
        ({"recipe.adaptive_every": 5}, ["recipe.adaptive_every", "run.telemetry_every"]),
    ):
        new = load_config(None, {**ADAPTIVE, **change})
        assert [c[0] for c in config_changes(saved, new)] == fields
    # with adaptive_on_divergence off, the divergence thresholds only label events again
    off = {**ADAPTIVE, "recipe.adaptive_on_divergence": False}
    assert config_changes(load_config(None, off),
                          load_config(None, {**off, "divergence.sigmas": 3.0})) == []  # fmt: skip


def test_resume_of_an_adaptive_run_with_another_telemetry_cadence_is_refused(
    tmp_path, data_cache, capsys
):
    over = small(tmp_path / "run", data_cache, "mxfp8-adaptive",
                 **{"run.steps": 4, "run.compile_quantize": False})  # fmt: skip
    assert main(["train", "--no-report", *cli_args(over), "--stop-after", "2"]) == 0
    before = tree_digest(tmp_path / "run")
    capsys.readouterr()
    code = main(["train", "--resume", "--out", str(tmp_path / "run"), "--run.telemetry_every", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "run.telemetry_every: 0 (every 25 steps: recipe.adaptive_every) -> 1" in err, err
    assert tree_digest(tmp_path / "run") == before
