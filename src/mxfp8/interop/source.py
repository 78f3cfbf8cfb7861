"""What ``mxfp8 eval`` and ``mxfp8 generate`` run: a model, its tokenizer and its recipe, from a
run directory, a checkpoint directory, or a Llama directory (an export, or transformers')."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from mxfp8.errors import UserError
from mxfp8.layers.convert import convert_model
from mxfp8.layers.precision import load_layer_state, precision_state_dict
from mxfp8.layers.recipe import Recipe
from mxfp8.layers.recipe import recipe as named_recipe
from mxfp8.model.transformer import Transformer


@dataclass
class Loaded:
    model: Transformer  # fp32 master weights, eval mode, linears converted to ``run_recipe``
    tokenizer: Tokenizer
    recipe: str  # the recipe's name (a preset, with the run's changes if any: see below)
    source: str  # what was loaded, for messages and eval.json
    run_config: Any  # the run's TrainConfig (a run, or an export that names its run), or None
    tokenizer_path: Path
    home: Path  # the run directory, or the model directory: where eval.json goes
    # the resolved recipe the model runs under (its autocast, its quantized layers): the
    # run's own (overrides, kept blocks, changed fields) unless --recipe named another
    run_recipe: Recipe
    # layers the run had switched to bf16 by that checkpoint (mxfp8-adaptive), re-applied
    precision_switches: dict[str, Any] = field(default_factory=dict)
    runs_recipe: bool = True  # False when --recipe replaced the run's

    def recipe_record(self) -> dict[str, Any]:
        """How eval.json records what the model ran under: the name, every resolved field,
        whether it is the run's own recipe, and the layers switched to bf16."""
        return {"recipe": self.recipe, "recipe_fields": self.run_recipe.to_dict(),
                "recipe_is_the_runs": self.runs_recipe,
                "precision_switches": sorted(self.precision_switches)}  # fmt: skip


def open_model(path: str | Path, *, step: int | None = None, recipe: str | None = None) -> Loaded:
    """Load ``path`` (see the module doc) as its run ran it at that checkpoint: converted to
    the run's resolved recipe (``[recipe]`` with its overrides and field changes), with the
    checkpoint's adaptive switches to bf16 and delayed-scaling state re-applied, so that its
    forward (:func:`mxfp8.model.transformer.inference_forward` under
    :attr:`Loaded.run_recipe`) is the one the run validated with, bit for bit.

    ``recipe`` (a named recipe) replaces the run's: a bf16-trained model under ``mxfp8``
    answers whether MX inference hurts. A Llama directory runs under the recipe of the run its
    export names when that checkpoint is still there (as above), else under the recipe name
    its export recorded, else ``bf16``."""
    from mxfp8.interop.export import PROVENANCE_FILE
    from mxfp8.model.pretrained import build_model, is_pretrained_dir, read_pretrained

    path = Path(path)
    run_config, state = None, {}
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
            run_config, state = _export_run(Path(info.get("checkpoint", "")))
        source = f"{path} (model directory)"
        tok_path, home = path / "tokenizer.json", path
    else:
        from mxfp8.checkpoint.find import find_checkpoint
        from mxfp8.interop.export import read_source

        ck = find_checkpoint(path, step)
        src = read_source(ck)
        model, tok, trained, run_config = src.model, src.tokenizer, src.recipe, src.config
        state = src.state
        source = checkpoint_source(ck, src.step)
        tok_path = src.tokenizer_path
        home = ck.parent.parent if ck.parent.name == "checkpoints" else ck
    if recipe is not None:  # another recipe, named: nothing of the run's applies
        rec, state = named_recipe(recipe), {}
    elif run_config is not None:
        rec = run_config.recipe.build()
    else:
        rec = named_recipe(trained)
    if rec.quantizes_any:
        model = convert_model(model, rec)
    load_layer_state(model, state)
    return Loaded(model.eval(), tok, recipe or trained, source, run_config, tok_path, home, rec,
                  precision_switches=precision_state_dict(model),
                  runs_recipe=recipe is None)  # fmt: skip


def checkpoint_source(checkpoint: Path, step: int) -> str:
    """How ``Loaded.source`` (and so ``eval.json``) names a checkpoint directory."""
    return f"{checkpoint} (step {step})"


def names_checkpoint(source: str, checkpoint: Path) -> bool:
    """Whether ``source`` (of :func:`checkpoint_source`) names ``checkpoint``, at any step."""
    return source.startswith(f"{checkpoint} (step ")


def _export_run(checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    """(config, state.pt) of the checkpoint an export came from, when it is still there;
    (None, {}) otherwise."""
    from mxfp8 import checkpoint as ckpt
    from mxfp8.config.train_config import load_config

    if not checkpoint.name or not (checkpoint / ckpt.CONFIG_FILE).is_file():
        return None, {}
    return load_config(checkpoint / ckpt.CONFIG_FILE), ckpt.load_state(checkpoint)


def run_split(run_config: Any) -> tuple[Any, str]:
    """(validation token ids, a description of them, as eval.json records it) of the run of
    ``run_config``: what ``mxfp8 eval RUN`` evaluates on by default."""
    from mxfp8.data.prepare import prepare_data

    cfg = run_config.data
    return prepare_data(cfg).val, f"{cfg.source} (the run's validation split)"


def eval_split(loaded: Loaded, data: str | None = None):
    """(validation token ids, a description of them): the run's validation split
    (:func:`run_split`), or that of the corpus ``data`` tokenized with the model's own
    tokenizer."""
    import dataclasses

    from mxfp8.data.prepare import DataConfig, prepare_data

    if data is None:
        if loaded.run_config is None:
            raise UserError(f"{loaded.source}: no run to take the validation split from: "
                            "pass --data SOURCE")  # fmt: skip
        return run_split(loaded.run_config)
    base = loaded.run_config.data if loaded.run_config is not None else DataConfig()
    cfg = dataclasses.replace(base, source=data, tokenizer=str(loaded.tokenizer_path))
    return prepare_data(cfg).val, f"{data} (validation split)"
