"""Loading a Llama directory into our Transformer (``mxfp8.load_pretrained``, and the start of
``run.init_from``): one that ``mxfp8 export`` wrote (either
format) or one that transformers wrote (``save_pretrained`` of a ``LlamaForCausalLM``).

MXFP8 weights (an ``F8_E4M3`` ``weight`` with an ``F8_E8M0`` ``weight_scale_inv`` beside it)
are dequantized exactly: the model then computes with the MX-fake-quantized weights, in fp32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from mxfp8.errors import UserError
from mxfp8.model import llama
from mxfp8.model.config import ModelConfig
from mxfp8.model.llama import INDEX_FILE, MX_BLOCK, SCALE_SUFFIX, SINGLE_FILE
from mxfp8.model.transformer import Transformer
from mxfp8.numerics.formats import E4M3, ScaleRule
from mxfp8.numerics.tensor import MXTensor


@dataclass(frozen=True)
class Pretrained:
    """A Llama directory read into our terms."""

    path: Path
    model_cfg: ModelConfig
    weights: dict[str, torch.Tensor]  # our names, fp32
    tokenizer: Tokenizer | None


def is_pretrained_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and (
        (Path(path) / SINGLE_FILE).is_file() or (Path(path) / INDEX_FILE).is_file()
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise UserError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path / name}: unreadable ({e})") from None
    return tensors


def _dequantize_mx(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each (FP8 weight, E8M0 weight_scale_inv) pair replaced by its exact fp32 value; every
    other tensor in fp32."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale_name = name.removesuffix("weight") + SCALE_SUFFIX
        if name.endswith(".weight") and scale_name in tensors:
            scale = tensors[scale_name]
            if t.dtype != torch.float8_e4m3fn or scale.dtype not in (torch.float8_e8m0fnu,
                                                                     torch.uint8):  # fmt: skip
                raise UserError(f"{name}: an MX weight must be F8_E4M3 with F8_E8M0 scales, "
                                f"got {t.dtype} and {scale.dtype}")  # fmt: skip
            n, k = t.shape
            if tuple(scale.shape) != (n, k // MX_BLOCK):
                want = (n, k // MX_BLOCK)
                raise UserError(f"{scale_name}: shape {tuple(scale.shape)}, expected {want} "
                                f"(one scale per {MX_BLOCK} along K)")  # fmt: skip
            mx = MXTensor(t, scale.view(torch.float8_e8m0fnu), E4M3, MX_BLOCK, 1, ScaleRule.RCEIL)
            out[name] = mx.dequantize(torch.float32)  # (the rule only records how it was made)
        else:
            out[name] = t.float()
    return out


def read_pretrained(path: str | Path) -> Pretrained:
    """Config, fp32 weights (our names) and tokenizer (None without tokenizer.json)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json: not a model directory")
    model_cfg = llama.model_config(json.loads((path / "config.json").read_text()))
    weights = llama.from_hf(_dequantize_mx(_read_tensors(path)), model_cfg)
    tok_file = path / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
    return Pretrained(path, model_cfg, weights, tok)


def load_weights(model: Transformer, pre: Pretrained, *, error: type[UserError] = UserError,
                 where: str | None = None) -> None:  # fmt: skip
    """Copy ``pre``'s weights into ``model`` (strict): a missing tensor, or a shape the model
    does not have, raises ``error`` naming it (after ``where``, default the directory)."""
    where = where or str(pre.path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(pre.weights))
    if missing:
        raise error(f"{where}: missing weights for {', '.join(missing[:5])}")
    for name, t in expected.items():
        got = tuple(pre.weights[name].shape)
        if got != tuple(t.shape):
            raise error(f"{where}: {name} has shape {got}, the model needs {tuple(t.shape)}")
    model.load_state_dict(pre.weights, strict=True)


def build_model(pre: Pretrained) -> Transformer:
    """Our Transformer holding ``pre``'s weights (see :func:`load_weights`)."""
    with torch.device("meta"):
        model = Transformer(pre.model_cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # ties the head and builds the RoPE tables; weights come next
    load_weights(model, pre)
    return model


def load_pretrained(path: str | Path) -> Transformer:
    """Our Transformer (fp32, on CPU, eval mode) from a Llama directory, either export format
    or one transformers wrote; MXFP8 weights come in dequantized exactly."""
    model = build_model(read_pretrained(path))
    return model.eval()
