"""``run.init_from``: continued pre-training from a Llama directory (an ``mxfp8 export``, or
one transformers wrote with ``save_pretrained``).

The directory decides the model: its ``config.json`` becomes the run's model shape (a
``model.*`` field the user set to something else is an error naming both values), and its
``tokenizer.json`` the run's tokenizer unless ``data.tokenizer`` names one (the token ids must
mean what the weights learned). The vocabulary is then checked like any run's: the model's
must hold the tokenizer's. The weights are loaded at step 0 only; a resumed run continues from
its checkpoint and needs the directory no more.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mxfp8.config.fields import ConfigError
from mxfp8.config.train_config import ModelSection, TrainConfig
from mxfp8.model import pretrained
from mxfp8.model.config import ModelConfig
from mxfp8.model.pretrained import Pretrained, is_pretrained_dir, read_pretrained
from mxfp8.model.transformer import Transformer


def apply(cfg: TrainConfig, *, fresh: bool, say) -> tuple[TrainConfig, Pretrained | None]:
    """``cfg`` with the directory's model shape and tokenizer, and its weights when the run
    starts at step 0 (``fresh``); ``cfg`` unchanged when there is no ``run.init_from``."""
    if not cfg.run.init_from:
        return cfg, None
    path = Path(cfg.run.init_from).expanduser()
    if not fresh and not is_pretrained_dir(path):
        return cfg, None  # resuming: the saved config holds the shape, the checkpoint the weights
    if not is_pretrained_dir(path):
        raise ConfigError(f"run.init_from = {path}: not a model directory (needs config.json "
                          "and model.safetensors or its index)")  # fmt: skip
    pre = read_pretrained(path)
    shape = {f.name: getattr(pre.model_cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    given = cfg.model.build()
    set_by_user = [k for k in cfg.model.overrides if k in shape]
    clash = [f"model.{k} = {getattr(given, k)!r} (the directory has {shape[k]!r})"
             for k in set_by_user if getattr(given, k) != shape[k]]  # fmt: skip
    if clash:
        raise ConfigError(f"run.init_from = {path} fixes the model shape, but "
                          f"{'; '.join(clash)}: drop those options")  # fmt: skip
    cfg = cfg.replace(model=ModelSection(cfg.model.preset, shape))
    tok = path / "tokenizer.json"
    if not cfg.data.tokenizer:
        if not tok.is_file():
            raise ConfigError(f"run.init_from = {path} has no tokenizer.json: name the tokenizer "
                              "its weights were trained with in data.tokenizer")  # fmt: skip
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, tokenizer=str(tok)))
    m = pre.model_cfg
    say(f"init from {path}: {m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}"
        + (" (weights at step 0)" if fresh else ""))  # fmt: skip
    return cfg, (pre if fresh else None)


def load_weights(model: Transformer, pre: Pretrained) -> None:
    """Copy ``pre``'s weights into the freshly built ``model`` (same config: checked)."""
    pretrained.load_weights(model, pre, error=ConfigError, where=f"run.init_from = {pre.path}")
