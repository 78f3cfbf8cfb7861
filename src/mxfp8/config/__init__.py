"""The config floor: the run config (:class:`~mxfp8.config.train_config.TrainConfig`, its TOML
and command-line forms), its plain sections (:mod:`~mxfp8.config.sections`) and the field
machinery that gives each field its help, type checks and errors
(:mod:`~mxfp8.config.fields`). It composes the model, data, recipe, divergence and parallel
settings of the floors below and imports nothing above them (the optimizer imports it)."""

from mxfp8.config.fields import ConfigError
from mxfp8.config.train_config import TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
