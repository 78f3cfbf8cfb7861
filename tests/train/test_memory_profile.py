"""``run.memory = lean`` (``--memory lean``) and ``run.compact_activations`` on the path users
run: the profile fills the fields it names unless the config sets them, the saved config
reloads to the same run, a lean run resumes bit for bit and composes with activation
checkpointing bit for bit, its losses follow the default run's within MX noise, and a resume
that changes a saver is refused."""

from __future__ import annotations

import pytest

from mxfp8.checkpoint.resume import ResumeError
from mxfp8.config.fields import ConfigError
from mxfp8.config.sections import LEAN_PROFILE
from mxfp8.config.train_config import TrainConfig, load_config
from mxfp8.train.loop import train
from mxfp8.train.runlog import read_metrics
from run_helpers import exact, small


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Compares training numbers: one torch thread (tests/conftest.py)."""


def _field(cfg: TrainConfig, dotted: str):
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), key)


def test_the_profile_fills_its_fields_unless_the_config_sets_them(tmp_path):
    default, lean = load_config(), load_config(overrides={"run.memory": "lean"})
    assert LEAN_PROFILE  # every field of the profile is set, and differs from the default
    for dotted, value in LEAN_PROFILE.items():
        want = tuple(value) if isinstance(value, list) else value
        assert _field(lean, dotted) == want, dotted
        assert _field(default, dotted) != want, dotted
    mine = load_config(overrides={"run.memory": "lean", "run.loss_chunk": 0,
                                  "run.compact_activations": "norm"})  # fmt: skip
    assert mine.run.loss_chunk == 0 and mine.run.compact_activations == ("norm",)
    # the saved config names every field: loading it gives the same run
    path = tmp_path / "config.toml"
    mine.save(path)
    assert load_config(path) == mine
    # a TOML file saying only `memory = "lean"` gets the profile too
    path.write_text('[run]\nmemory = "lean"\n')
    assert load_config(path) == lean
    with pytest.raises(ConfigError, match="'huge'"):
        load_config(overrides={"run.memory": "huge"})
    with pytest.raises(ConfigError, match="unknown compact activation 'mlp'"):
        load_config(overrides={"run.compact_activations": "norm,mlp"})
    with pytest.raises(ConfigError, match="run.compile"):
        load_config(overrides={"run.compact_activations": "norm", "run.compile": True})


def test_a_lean_run_resumes_exactly_composes_with_checkpointing_and_follows_mxfp8(
    tmp_path, data_cache
):
    over = {"run.steps": 6, "run.log_every": 1, "run.eval_every": 3, "run.memory": "lean",
            "run.compact_activations": "norm,swiglu,attention"}  # fmt: skip
    train(
        load_config(
            None,
            small(
                tmp_path / "plain",
                data_cache,
                "mxfp8",
                **{
                    k: v
                    for k, v in over.items()
                    if k not in ("run.memory", "run.compact_activations")
                },
            ),
        )
    )
    train(load_config(None, small(tmp_path / "lean", data_cache, "mxfp8", **over)))
    ac = {**over, "run.activation_checkpointing": "block"}
    train(load_config(None, small(tmp_path / "ac", data_cache, "mxfp8", **ac)))
    plain, lean = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "lean")
    # step 1: the same forward (the activations are stored compactly, not computed otherwise)
    assert abs(lean[0]["loss"] - plain[0]["loss"]) <= 1e-6 * plain[0]["loss"]
    # then the gradients taken at the MX of the saved tensors move the run a little
    assert lean[-1]["loss"] != plain[-1]["loss"]
    for a, b in zip(lean, plain, strict=True):
        assert abs(a["loss"] - b["loss"]) < 2e-2 * b["loss"], a["step"]
    # block checkpointing replays the same compact ops: bit for bit
    assert exact(read_metrics(tmp_path / "ac")) == exact(lean)
    part = tmp_path / "part"
    train(load_config(None, small(part, data_cache, "mxfp8", **over, **{"run.stop_after": 3})))
    changed = {**over, "run.compact_activations": "norm", "run.resume": True}
    with pytest.raises(ResumeError, match="run.compact_activations"):
        train(load_config(None, small(part, data_cache, "mxfp8", **changed)))
    train(load_config(None, small(part, data_cache, "mxfp8", **over, **{"run.resume": True})))
    assert exact(read_metrics(part)) == exact(lean)
