"""The run config: one frozen dataclass per component, composed into :class:`TrainConfig`.

Sections (TOML tables, and ``--section.field`` on the command line):

- ``model``: a preset name from :data:`mxfp8.model.config.MODEL_PRESETS` plus field overrides,
  validated through :func:`mxfp8.model.config.model_config`.
- ``data``: :class:`mxfp8.data.prepare.DataConfig`.
- ``optim``, ``schedule``, ``loss_scale``, ``run``, ``parallel``: :mod:`mxfp8.config.sections`.
- ``divergence``: the loss-spike detector's thresholds,
  :class:`mxfp8.stats.divergence.DivergenceConfig`.
- ``recipe``: a preset name from :func:`mxfp8.list_recipes` plus field overrides, validated
  through :class:`mxfp8.Recipe`.

Defaults are the main job (``mxfp8 train`` with no arguments): the ``tiny`` model under the
``mxfp8`` recipe on Shakespeare, sized to finish in under 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mxfp8.config.fields import (
    ConfigError,
    coerce,
    dumps_toml,
    field_defaults,
    field_help,
    field_types,
    opt,
    plain,
)
from mxfp8.config.sections import (
    LEAN_PROFILE,
    LossScaleConfig,
    LossScaleMode,
    MemoryProfile,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    ScheduleKind,
)
from mxfp8.data.prepare import DataConfig
from mxfp8.model.config import MODEL_PRESETS, ModelConfig, model_config
from mxfp8.stats.divergence import DivergenceConfig

__all__ = [
    "ConfigError",
    "DivergenceConfig",
    "LossScaleConfig",
    "LossScaleMode",
    "ModelSection",
    "OptimConfig",
    "ParallelConfig",
    "RecipeSection",
    "RunConfig",
    "ScheduleConfig",
    "ScheduleKind",
    "TrainConfig",
    "config_keys",
    "load_config",
]


@dataclass(frozen=True)
class ModelSection:
    """Model shape: a preset plus overrides of individual :class:`ModelConfig` fields."""

    preset: str = opt("tiny", f"model preset, one of {sorted(MODEL_PRESETS)}")
    overrides: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"help": "ModelConfig fields to change"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        try:
            self.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[model] {e}") from None

    def build(self) -> ModelConfig:
        """The resolved :class:`ModelConfig`."""
        return model_config(self.preset, **self.overrides)


@dataclass(frozen=True)
class RecipeSection:
    """Quantization recipe: a preset name plus overrides of individual Recipe fields."""

    name: str = opt("mxfp8", "recipe preset (see `mxfp8 recipes`)")
    overrides: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"help": "Recipe fields to change"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        try:
            self.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[recipe] {e}") from None

    def build(self) -> Any:
        """The resolved :class:`mxfp8.Recipe`."""
        from mxfp8.layers.recipe import recipe

        return recipe(self.name, **self.overrides)


# section name -> dataclass of plain sections (model and recipe are preset + overrides)
PLAIN_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "loss_scale": LossScaleConfig,
    "run": RunConfig,
    "divergence": DivergenceConfig,
    "parallel": ParallelConfig,
}
SECTIONS = ("model", "recipe", *PLAIN_SECTIONS)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; saved as ``config.toml`` in the run directory."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    recipe: RecipeSection = dataclasses.field(default_factory=RecipeSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    loss_scale: LossScaleConfig = dataclasses.field(default_factory=LossScaleConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    divergence: DivergenceConfig = dataclasses.field(default_factory=DivergenceConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        m = self.model.build()
        if self.run.seq_len > m.max_seq_len:
            raise ConfigError(
                f"run.seq_len ({self.run.seq_len}) exceeds model max_seq_len ({m.max_seq_len})"
            )

    def replace(self, **sections: Any) -> TrainConfig:
        """A copy with some sections replaced, e.g. ``cfg.replace(run=run)``."""
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (what :meth:`from_dict` reads; TOML/JSON friendly)."""
        out: dict[str, Any] = {
            "model": {"preset": self.model.preset, **plain(dict(self.model.overrides))},
            "recipe": {"name": self.recipe.name, **plain(dict(self.recipe.overrides))},
        }
        for name in PLAIN_SECTIONS:
            out[name] = plain(getattr(self, name))
        return out

    def resolved(self) -> dict[str, Any]:
        """Every field of the resolved model and recipe (what actually runs)."""
        rec = self.recipe.build().to_dict()
        rec.pop("description", None)
        return {"model": plain(self.model.build()), "recipe": rec}

    def to_toml(self) -> str:
        """TOML text; the ``[resolved.*]`` tables are for readers and are ignored on load."""
        body = self.to_dict()
        body["resolved"] = self.resolved()
        return dumps_toml(body, header="mxfp8 run config (mxfp8 train --config THIS_FILE)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build and validate from a nested dict (missing keys take their defaults)."""
        data = _with_profile({k: v for k, v in data.items() if k != "resolved"})
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; sections are {list(SECTIONS)}")
        kwargs: dict[str, Any] = {}
        for name, body in data.items():
            if not isinstance(body, Mapping):
                raise ConfigError(f"config section [{name}] must be a table, got {body!r}")
            kwargs[name] = _build_section(name, dict(body))
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, text: str) -> TrainConfig:
        try:
            return cls.from_dict(tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid TOML: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())


def _with_profile(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the fields of its ``run.memory`` profile filled in where it does not set
    them (:data:`~mxfp8.config.sections.LEAN_PROFILE`); the saved config then names every
    field, so loading it again gives the same run."""
    run = data.get("run")
    if not isinstance(run, Mapping) or str(run.get("memory", "default")) != MemoryProfile.LEAN:
        return data
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for dotted, value in LEAN_PROFILE.items():
        section, _, key = dotted.partition(".")
        body = out.setdefault(section, {})
        if isinstance(body, dict):
            body.setdefault(key, value)
    return out


def _model_field_types() -> dict[str, Any]:
    return field_types(ModelConfig)


def _recipe_field_types() -> dict[str, Any]:
    from mxfp8.layers.recipe import Recipe

    types_ = field_types(Recipe)
    types_.pop("name", None)
    types_.pop("description", None)
    return types_


def _unknown_key(section: str, key: str, valid: list[str]) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {section}.{close[0]}?)" if close else ""
    return ConfigError(
        f"unknown config key {section}.{key}{hint}; valid keys in [{section}]: {', '.join(valid)}"
    )


def _build_section(name: str, body: dict[str, Any]) -> Any:
    """One section from a dict of raw values (TOML values or CLI strings), type-checked."""
    if name in ("model", "recipe"):
        head = "preset" if name == "model" else "name"
        types_ = _model_field_types() if name == "model" else _recipe_field_types()
        valid = [head, *types_]
        head_value = body.pop(head, None)
        overrides = {}
        for key, value in body.items():
            if key not in types_:
                raise _unknown_key(name, key, valid)
            overrides[key] = coerce(value, types_[key], f"{name}.{key}")
        cls = ModelSection if name == "model" else RecipeSection
        kwargs: dict[str, Any] = {"overrides": overrides}
        if head_value is not None:
            kwargs[head] = coerce(head_value, str, f"{name}.{head}")
        return cls(**kwargs)
    cls = PLAIN_SECTIONS[name]
    types_ = field_types(cls)
    kwargs = {}
    for key, value in body.items():
        if key not in types_:
            raise _unknown_key(name, key, list(types_))
        kwargs[key] = coerce(value, types_[key], f"{name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{name}] {e}") from None


def apply_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``{"section.field": value}`` into a nested dict (values converted when built)."""
    out = {k: dict(v) for k, v in base.items() if isinstance(v, Mapping)}
    for dotted, value in overrides.items():
        section, sep, key = dotted.partition(".")
        if not sep or section not in SECTIONS:
            raise ConfigError(
                f"override {dotted!r} must be SECTION.FIELD with SECTION one of {list(SECTIONS)}"
            )
        if section == "model" and key == "preset":
            # a new preset starts from that preset: drop the previous model's field values
            out["model"] = {}
        if section == "recipe" and key == "name":
            out["recipe"] = {}
        out.setdefault(section, {})[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``{"section.field": value}``."""
    base: dict[str, Any] = {}
    if path is not None:
        try:
            base = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid TOML in {path}: {e}") from None
        base.pop("resolved", None)
    return TrainConfig.from_dict(apply_overrides(base, overrides or {}))


_PRESET = " (default: from the preset)"
_MODEL_DEFAULT_NOTE = {"vocab_size": " (default: the tokenizer's vocabulary size)"}


def config_keys() -> dict[str, list[tuple[str, Any, Any, str]]]:
    """Every settable key per section: (field, type, default, help). Drives ``--help``."""
    from mxfp8.layers.recipe import Recipe, recipe

    out: dict[str, list[tuple[str, Any, Any, str]]] = {}
    tiny = MODEL_PRESETS["tiny"]
    out["model"] = [("preset", str, "tiny", field_help(ModelSection, "preset"))]
    out["model"] += [
        (k, t, getattr(tiny, k), field_help(ModelConfig, k) + _MODEL_DEFAULT_NOTE.get(k, _PRESET))
        for k, t in _model_field_types().items()
    ]
    default_recipe = recipe(RecipeSection().name)
    out["recipe"] = [("name", str, RecipeSection().name, field_help(RecipeSection, "name"))]
    out["recipe"] += [
        (k, t, getattr(default_recipe, k), field_help(Recipe, k) + _PRESET)
        for k, t in _recipe_field_types().items()
    ]
    for name, cls in PLAIN_SECTIONS.items():
        defaults = field_defaults(cls)
        out[name] = [
            (k, t, defaults.get(k), field_help(cls, k)) for k, t in field_types(cls).items()
        ]
    return out
