"""``mxfp8 export``: a checkpoint as a transformers ``LlamaForCausalLM`` directory.

Two formats, one layout (``config.json``, ``generation_config.json``, the weights, the
tokenizer files, and ``mxfp8_export.json`` saying where it came from):

- ``hf``: every weight in ``--dtype`` (bf16 or fp32), under transformers' names
  (:mod:`mxfp8.model.llama`); ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it.
- ``mxfp8``: the same, except the weight of each linear layer the recipe converts (the
  transformer blocks' q/k/v/o and gate/up/down), stored as the fprop GEMM quantizes it:
  ``weight`` as FP8 (F8_E4M3) [N, K] and ``weight_scale_inv`` as E8M0 (F8_E8M0) [N, K/32],
  one power-of-two scale per 32 consecutive elements of a row (blocks along K, the reduction
  dim), unswizzled; dequantized weight = ``weight * 2^(weight_scale_inv - 127)``, exactly.
  Embeddings, the LM head and the norms stay in ``--dtype``. ``config.json`` carries a
  ``quantization_config`` in transformers' fine-grained FP8 convention (``quant_method``
  ``fp8``, ``weight_block_size`` [1, 32], ``scale_fmt`` ``ue8m0``,
  ``modules_to_not_convert``); see docs/interop.md for what the installed transformers does
  with it, and :func:`mxfp8.load_pretrained` for loading it here.

Weights above ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors`` with a
``model.safetensors.index.json``, as transformers writes them. The directory is written under
a temporary name and renamed when complete: a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from mxfp8.config.train_config import TrainConfig
from mxfp8.errors import UserError
from mxfp8.model import llama
from mxfp8.model.config import ModelConfig
from mxfp8.model.llama import INDEX_FILE, MX_BLOCK, SCALE_SUFFIX, SINGLE_FILE
from mxfp8.model.transformer import Transformer

FORMATS = ("hf", "mxfp8")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MAX_SHARD_BYTES = 2 * 2**30
PROVENANCE_FILE = "mxfp8_export.json"


@dataclass(frozen=True)
class Source:
    """What an export reads: the checkpoint, its run config, the model holding its weights
    (fp32), the weights by our names, the tokenizer, and which linears go to MXFP8."""

    checkpoint: Path
    step: int
    config: TrainConfig
    model: Transformer
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    tokenizer_path: Path
    mx_linears: frozenset[str]  # fqns of the linears the recipe quantizes (convert_model's)
    scale_rule: str
    state: dict[str, Any]  # the checkpoint's state.pt (its layers' scaling and precision state)

    @property
    def recipe(self) -> str:
        return self.config.recipe.name

    @property
    def model_cfg(self) -> ModelConfig:
        return self.model.cfg


def read_source(checkpoint: Path) -> Source:
    """Load a (verified) checkpoint directory's weights, config and tokenizer."""
    from mxfp8 import checkpoint as ckpt
    from mxfp8.config.train_config import load_config
    from mxfp8.layers.convert import plan_conversion
    from mxfp8.layers.recipe import recipe as named_recipe

    cfg = load_config(checkpoint / ckpt.CONFIG_FILE)
    model = Transformer(cfg.model.build())
    model.load_state_dict(ckpt.read_weights(checkpoint, model), strict=True)  # all, right shapes
    state = ckpt.load_state(checkpoint, verify=False)
    tok_path = _run_tokenizer(cfg, state.get("data_identity") or {})
    rec = cfg.recipe.build()
    if not rec.quantized:  # a bf16 run exported as mxfp8: the default MX recipe's layers
        rec = named_recipe("mxfp8")
    # the linears the run quantized at this step: an adaptive run's switches ran in bf16
    switched = set(state.get("precision") or {})
    mx_linears = frozenset(plan_conversion(model, rec).converted) - switched
    return Source(
        checkpoint=checkpoint,
        step=int(state["step"]),
        config=cfg,
        model=model,
        weights={k: v.detach() for k, v in model.state_dict().items()},  # fp32, shared
        tokenizer=Tokenizer.from_file(str(tok_path)),
        tokenizer_path=tok_path,
        mx_linears=mx_linears,
        scale_rule=rec.scale_rule.value,
        state=state,
    )


def _run_tokenizer(cfg, identity: dict[str, Any]) -> Path:
    """The tokenizer.json the run trained with: its prepared-data folder (made again, exactly, if
    the cache is gone), checked against the sha256 the checkpoint recorded."""
    import hashlib

    from mxfp8.data.prepare import prepare_data

    data = prepare_data(cfg.data)
    path = data.path / "tokenizer.json"
    want = identity.get("tokenizer_sha256")
    if want is not None and hashlib.sha256(path.read_bytes()).hexdigest() != want:
        raise UserError(f"{path} is not the tokenizer this checkpoint was trained with "
                        f"(sha256 differs from the checkpoint's {want[:12]}...)")  # fmt: skip
    return path


def mx_weight(w: torch.Tensor, scale_rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 E4M3 [N, K], E8M0 [N, K/32]) of a weight, blocks along K: what fprop uses."""
    from mxfp8.numerics.quantize import quantize

    q = quantize(w.float(), "e4m3", dim=-1, scale_rule=scale_rule)
    return q.data.contiguous(), q.scale.contiguous()


def _tensors(src: Source, fmt: str, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list]:
    """(transformers-named tensors to write, HF names of the linears kept in ``dtype``)."""
    to_mx = set()
    if fmt == "mxfp8":  # the block dim is K (in_features): 32 must divide it
        to_mx = {llama.hf_name(f"{n}.weight") for n in src.mx_linears
                 if src.weights[f"{n}.weight"].shape[1] % MX_BLOCK == 0}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    kept = []
    for hf, t in llama.to_hf(src.weights, src.model_cfg).items():
        if hf in to_mx:
            data, scale = mx_weight(t, src.scale_rule)
            out[hf] = data
            out[hf.removesuffix("weight") + SCALE_SUFFIX] = scale
            continue
        if hf.endswith("_proj.weight") or hf == "lm_head.weight":
            kept.append(hf.removesuffix(".weight"))
        out[hf] = t.to(dtype).contiguous()
    if fmt == "mxfp8" and src.model_cfg.tie_embeddings:
        kept.append("lm_head")  # tied to the embedding: not an FP8 linear either
    return out, sorted(set(kept))


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    shards = _shards(tensors, max_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / name), metadata=meta)
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_tokenizer(tmp: Path, tok: Tokenizer, cfg: ModelConfig) -> tuple[int | None, int | None]:
    """tokenizer.json plus what transformers' AutoTokenizer needs to load it offline;
    returns the (bos, eos) ids (the document separator serves as both, as in GPT-2)."""
    from mxfp8.data.tokenizer import EOT, eot_id

    tok.save(str(tmp / "tokenizer.json"))
    eot = eot_id(tok)
    special = {} if eot is None else {"bos_token": EOT, "eos_token": EOT}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **special,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return eot, eot


def export(src: Source, out: Path, *, fmt: str = "hf", dtype: str = "bf16",
           max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:  # fmt: skip
    """Write ``src`` to the directory ``out`` (which must not exist, or be empty); returns
    what was written (files, bytes)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory: choose a new --out")
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors, kept = _tensors(src, fmt, DTYPES[dtype])
        files = _write_weights(tmp, tensors, max_shard_bytes)
        bos, eos = _write_tokenizer(tmp, src.tokenizer, src.model_cfg)
        extra = {}
        if fmt == "mxfp8":
            extra["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [1, MX_BLOCK],
                "scale_fmt": "ue8m0",
                "modules_to_not_convert": kept,
            }
        config = llama.hf_config(src.model_cfg, dtype=DTYPES[dtype], bos_id=bos, eos_id=eos,
                                 extra=extra)  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        nbytes = sum((tmp / f).stat().st_size for f in files)
        provenance = {
            "checkpoint": str(src.checkpoint),
            "step": src.step,
            "recipe": src.recipe,
            "format": fmt,
            "dtype": dtype,
            "weight_bytes": nbytes,
            "mx_scale_rule": src.scale_rule if fmt == "mxfp8" else None,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "files": files, "weight_bytes": nbytes, **provenance}
