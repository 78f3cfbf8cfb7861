"""The run config: defaults, TOML round trips, overrides and their errors, help text."""

from __future__ import annotations

import dataclasses

import pytest

from mxfp8.config.fields import ConfigError
from mxfp8.config.sections import LossScaleMode, ScheduleKind
from mxfp8.config.train_config import TrainConfig, config_keys, load_config
from mxfp8.model.compiled_blocks import CompileMode


def test_defaults_are_the_main_job():
    cfg = TrainConfig()
    assert (cfg.model.preset, cfg.recipe.name, cfg.data.source) == ("tiny", "mxfp8", "shakespeare")
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.eps == 1e-8
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
    assert cfg.run.telemetry_every == 0 and cfg.loss_scale.enabled is LossScaleMode.AUTO


def test_toml_round_trip_with_every_kind_of_value(tmp_path):
    cfg = load_config(
        None,
        {
            "model.d_model": "192",
            "recipe.name": "fp8-delayed",
            "recipe.amax_reduce": "ema",
            "recipe.keep_high_precision": "output,tok_embeddings,layers.0.*",
            "optim.betas": "0.8,0.99",
            "optim.clip_modules": "layers.*.attention.*=0.5,output=2",
            "schedule.kind": "wsd",
            "loss_scale.enabled": "on",
            "run.tokens_per_step": "4096",
            "run.batch_size": "16",
            "run.seq_len": "128",
            "run.compile": "true",
            "data.source": 'odd "name", with comma.txt',
        },
    )
    path = tmp_path / "c.toml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert again.schedule.kind is ScheduleKind.WSD and again.run.compile is CompileMode.MODEL
    assert again.recipe.build().keep_high_precision == ("output", "tok_embeddings", "layers.0.*")
    assert again.model.build().d_model == 192 and again.run.accum_steps == 2
    assert again.optim.module_thresholds() == (("layers.*.attention.*", 0.5), ("output", 2.0))
    text = path.read_text()  # every resolved field is written, for readers
    assert "[resolved.model]" in text and "ffn_hidden = 1024" in text
    assert "[resolved.recipe]" in text and 'amax_reduce = "ema"' in text


def test_overrides_on_top_of_a_file_and_preset_reset(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npreset = "tiny"\nn_layers = 3\n[run]\nsteps = 7\n')
    cfg = load_config(path, {"run.seed": "5"})
    assert cfg.model.build().n_layers == 3 and cfg.run.steps == 7 and cfg.run.seed == 5
    cfg = load_config(path, {"model.preset": "125m"})  # a new preset drops the old fields
    assert cfg.model.build().n_layers == 12


@pytest.mark.parametrize(
    "override, message",
    [
        ({"optim.lrr": "1"}, "unknown config key optim.lrr (did you mean optim.lr?); valid keys"),
        ({"optim.lr": "fast"}, "invalid value 'fast' for optim.lr (expected float)"),
        ({"run.steps": "1.5"}, "invalid value '1.5' for run.steps (expected int)"),
        (
            {"run.compile": "maybe"},
            "invalid value 'maybe' for run.compile (expected {none|block|model})",
        ),
        ({"schedule.kind": "linear"}, "{warmup-cosine|constant|wsd}"),
        ({"run.steps": "0"}, "run.steps must be >= 1"),
        ({"run.quantize_kernel": "fast"}, "run.quantize_kernel (expected {auto|eager|inductor"),
        ({"recipe.scale_rule": "up"}, "{rceil|floor}"),
        ({"recipe.name": "fp4"}, "unknown recipe 'fp4'"),
        ({"recipe.blocksize": "16"}, "recipe.blocksize (did you mean recipe.block_size?)"),
        ({"model.preset": "huge"}, "unknown model preset 'huge'"),
        ({"model.d_model": "100"}, "must be divisible by n_heads"),
        ({"optim.clip_modules": "wq"}, "'PATTERN=MAX_NORM'"),
        ({"run.tokens_per_step": "1000"}, "multiple of batch_size * seq_len"),
        ({"run.seq_len": "4096"}, "exceeds model max_seq_len"),
        ({"trainer.steps": "1"}, "SECTION one of"),
        ({"divergence.ema_decay": "1"}, "divergence.ema_decay must be in (0, 1)"),
        ({"divergence.sigma": "3"}, "did you mean divergence.sigmas?"),
    ],
)
def test_wrong_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)


def test_unknown_key_in_a_file_lists_valid_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[run]\nstep = 3\n")
    with pytest.raises(ConfigError, match="valid keys in \\[run\\]: steps, batch_size"):
        load_config(path)
    path.write_text("[run\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_every_field_has_help():
    keys = config_keys()
    assert set(keys) == {
        "model", "recipe", "data", "optim", "schedule", "loss_scale", "run", "divergence",
        "parallel",
    }  # fmt: skip
    for section, entries in keys.items():
        for name, _tp, _default, help_text in entries:
            assert help_text.strip(), f"{section}.{name} has no help text"
    run_fields = {f.name for f in dataclasses.fields(TrainConfig().run)}
    assert run_fields == {e[0] for e in keys["run"]}


def test_divergence_thresholds_are_a_config_section(tmp_path):
    cfg = load_config(None, {"divergence.sigmas": "3", "divergence.warmup_steps": "5"})
    assert (cfg.divergence.sigmas, cfg.divergence.warmup_steps) == (3.0, 5)
    assert cfg.divergence.min_rel == TrainConfig().divergence.min_rel
    path = tmp_path / "c.toml"
    cfg.save(path)
    assert load_config(path) == cfg
    path.write_text("[run]\nsteps = 3\n")  # a config written before the section existed
    assert load_config(path).divergence == TrainConfig().divergence


def test_quantize_kernel_is_checked_against_the_device_before_the_model_is_built():
    import torch

    from mxfp8.train.session import _quantize_kernel

    assert _quantize_kernel("auto", torch.device("cpu")) is None
    assert _quantize_kernel("inductor", torch.device("cpu")) == "inductor"
    with pytest.raises(ConfigError, match="run.quantize_kernel = cpu: kernel 'cpu' runs on CPU"):
        _quantize_kernel("cpu", torch.device("cuda"))
