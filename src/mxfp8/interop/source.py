"""What ``mxfp8 eval`` and ``mxfp8 generate`` run: a model, its tokenizer and its recipe, from a
run directory, a checkpoint directory, or a Llama directory (an export, or transformers')."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from mxfp8.errors import UserError
from mxfp8.train.model import Transformer


@dataclass
class Loaded:
    model: Transformer  # fp32 master weights, eval mode, linears converted to ``recipe``
    tokenizer: Tokenizer
    recipe: str
    source: str  # what was loaded, for messages and eval.json
    run_config: Any  # the run's TrainConfig (a run, or an export that names its run), or None
    tokenizer_path: Path
    home: Path  # the run directory, or the model directory: where eval.json goes


def open_model(path: str | Path, *, step: int | None = None, recipe: str | None = None) -> Loaded:
    """Load ``path`` (see the module doc). ``recipe`` (a named recipe) replaces the one the
    model was trained with: a bf16-trained model under ``mxfp8`` answers whether MX
    inference hurts; a Llama directory defaults to ``bf16``, or to the recipe its export
    recorded."""
    from mxfp8.interop.export import PROVENANCE_FILE
    from mxfp8.layers.convert import convert_model
    from mxfp8.layers.recipe import recipe as named_recipe
    from mxfp8.train.pretrained import build_model, is_pretrained_dir, read_pretrained

    path = Path(path)
    run_config = None
    if is_pretrained_dir(path):
        if step is not None:
            raise UserError(f"{path} is a model directory: --step applies to a run directory")
        pre = read_pretrained(path)
        if pre.tokenizer is None:
            raise UserError(f"{path} has no tokenizer.json")
        model, tok = build_model(pre), pre.tokenizer
        trained = "bf16"
        prov = path / PROVENANCE_FILE
        if prov.is_file():
            info = json.loads(prov.read_text())
            trained = info.get("recipe", "bf16")
            run_config = _export_run_config(Path(info.get("checkpoint", "")))
        source = f"{path} (model directory)"
        tok_path, home = path / "tokenizer.json", path
    else:
        from mxfp8.interop.export import read_source
        from mxfp8.train.checkpoint_load import find_checkpoint

        ck = find_checkpoint(path, step)
        src = read_source(ck)
        model, tok, trained, run_config = src.model, src.tokenizer, src.recipe, src.config
        source = checkpoint_source(ck, src.step)
        tok_path = src.tokenizer_path
        home = ck.parent.parent if ck.parent.name == "checkpoints" else ck
    name = recipe or trained
    rec = named_recipe(name)
    if rec.quantized:
        model = convert_model(model, rec)
    return Loaded(model.eval(), tok, name, source, run_config, tok_path, home)


def checkpoint_source(checkpoint: Path, step: int) -> str:
    """How ``Loaded.source`` (and so ``eval.json``) names a checkpoint directory."""
    return f"{checkpoint} (step {step})"


def names_checkpoint(source: str, checkpoint: Path) -> bool:
    """Whether ``source`` (of :func:`checkpoint_source`) names ``checkpoint``, at any step."""
    return source.startswith(f"{checkpoint} (step ")


def _export_run_config(checkpoint: Path):
    """The config of the run an export came from, when that checkpoint is still there."""
    from mxfp8.train.config import load_config
    from mxfp8.train.manifest import CONFIG_FILE

    path = checkpoint / CONFIG_FILE
    return load_config(path) if checkpoint.name and path.is_file() else None


def eval_split(loaded: Loaded, data: str | None = None):
    """(validation token ids, a description of them): the run's validation split, or that
    of the corpus ``data`` tokenized with the model's own tokenizer."""
    import dataclasses

    from mxfp8.train.data import DataConfig, prepare_data

    if data is None:
        if loaded.run_config is None:
            raise UserError(f"{loaded.source}: no run to take the validation split from: "
                            "pass --data SOURCE")  # fmt: skip
        cfg = loaded.run_config.data
        return prepare_data(cfg).val, f"{cfg.source} (the run's validation split)"
    base = loaded.run_config.data if loaded.run_config is not None else DataConfig()
    cfg = dataclasses.replace(base, source=data, tokenizer=str(loaded.tokenizer_path))
    return prepare_data(cfg).val, f"{data} (validation split)"
