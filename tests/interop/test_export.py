"""Export to a transformers Llama directory and back, checked against the transformers the
project installs (offline, CPU): logits, greedy continuations, the tokenizer, the MXFP8
format's tensors, sharding, and round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from safetensors import safe_open

from mxfp8.checkpoint.find import find_checkpoint
from mxfp8.config.train_config import load_config
from mxfp8.errors import UserError
from mxfp8.interop.export import export, mx_weight, read_source
from mxfp8.interop.generate import generate
from mxfp8.model import llama
from mxfp8.model.pretrained import load_pretrained, read_pretrained
from mxfp8.numerics.quantize import quantize
from mxfp8.train import golden
from mxfp8.train.loop import train

SAMPLE = "To be, or not to be, that is the question:\nWhether 'tis nobler"


@pytest.fixture(scope="module", params=["tied", "untied"])
def source(request, tmp_path_factory, data_cache):
    """A 3-step mxfp8 run of the golden model (GQA: 2 query heads, 1 K/V head), with a tied
    or an untied LM head, read as an export source."""
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "recipe.name": "mxfp8",
            "run.out": str(out), "run.steps": 3, "run.eval_every": 0,
            "model.tie_embeddings": str(request.param == "tied").lower()}  # fmt: skip
    train(load_config(None, over))
    return read_source(find_checkpoint(out, None))


def _hf(path, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    return model.eval()


def _batch(src, n=2, t=40):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, src.model_cfg.vocab_size, (n, t), generator=g)


def test_hf_format_loads_in_transformers_with_the_same_logits_and_tokens(source, tmp_path):
    export(source, tmp_path / "hf", fmt="hf", dtype="fp32")
    theirs = _hf(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    idx = _batch(source)
    with torch.no_grad():
        diff = (theirs(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4
    # greedy: 32 new tokens from a prompt, transformers' generate against ours
    prompt = source.tokenizer.encode(SAMPLE).ids[:12]
    with torch.no_grad():
        hf_ids = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32)[0, len(prompt):].tolist()  # fmt: skip
    assert list(generate(ours, prompt, max_new_tokens=32)) == hf_ids
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.encode(SAMPLE) == source.tokenizer.encode(SAMPLE).ids
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_tied_head_is_written_once_and_untied_head_is_written(source, tmp_path):
    export(source, tmp_path / "hf", fmt="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tied = source.model_cfg.tie_embeddings
    assert config["tie_word_embeddings"] is tied
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert ("lm_head.weight" in keys) is not tied
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    theirs = _hf(tmp_path / "hf")
    head, emb = theirs.lm_head.weight, theirs.model.embed_tokens.weight
    assert (head.data_ptr() == emb.data_ptr()) is tied
    assert torch.equal(head, source.weights["output.weight"].bfloat16().float())


def test_rope_needs_no_permutation_and_the_check_would_see_one(source, tmp_path):
    """The rotate-half RoPE matches transformers as is. Applying the permutation that
    interleaved (Meta-layout) checkpoints need to q and k breaks the match, so the logits
    test above would catch a wrong layout."""
    cfg = source.model_cfg
    hd = cfg.head_dim
    # sharper attention than 3 training steps give, so that positions matter in the logits
    sharp = {n: t * 8 if ".wq." in n or ".wk." in n else t for n, t in source.weights.items()}
    source = dataclasses.replace(source, weights=sharp)
    weights = dict(sharp)

    def interleave(w, heads):  # [heads * hd, d]: rows (i, i + hd/2) -> (2i, 2i + 1)
        return w.view(heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)

    for i in range(cfg.n_layers):
        q, k = f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight"
        weights[q] = interleave(weights[q], cfg.n_heads)
        weights[k] = interleave(weights[k], cfg.n_kv_heads)
    export(source, tmp_path / "ok", fmt="hf", dtype="fp32")
    permuted = dataclasses.replace(source, weights=weights)
    export(permuted, tmp_path / "permuted", fmt="hf", dtype="fp32")
    ours = load_pretrained(tmp_path / "ok")
    idx = _batch(source)
    with torch.no_grad():
        good = (_hf(tmp_path / "ok")(idx).logits - ours(idx)[0]).abs().max().item()
        bad = (_hf(tmp_path / "permuted")(idx).logits - ours(idx)[0]).abs().max().item()
    assert good <= 1e-4 < 1e-2 < bad


def test_mxfp8_format_tensors_and_transformers_loading(source, tmp_path):
    res = export(source, tmp_path / "mx", fmt="mxfp8")
    bf16 = export(source, tmp_path / "bf", fmt="hf")
    assert res["weight_bytes"] < bf16["weight_bytes"]
    config = json.loads((tmp_path / "mx" / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["weight_block_size"], q["scale_fmt"]) == ("fp8", [1, 32], "ue8m0")
    assert "lm_head" in q["modules_to_not_convert"]
    w = source.weights["layers.0.feed_forward.w1.weight"]  # [ffn, d]: N x K
    with safe_open(str(tmp_path / "mx" / "model.safetensors"), "pt") as f:
        data = f.get_tensor("model.layers.0.mlp.gate_proj.weight")
        scale = f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale_inv")
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert data.dtype == torch.float8_e4m3fn and tuple(data.shape) == tuple(w.shape)
    assert scale.dtype == torch.float8_e8m0fnu and tuple(scale.shape) == (
        w.shape[0],
        w.shape[1] // 32,
    )
    ref = quantize(w, "e4m3", dim=-1)  # blocks along K, rceil: what fprop uses
    assert torch.equal(data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(scale.view(torch.uint8), ref.scale.view(torch.uint8))
    # ours: the stored weights dequantize to exactly the MX-fake-quantized fp32 weights
    ours = load_pretrained(tmp_path / "mx")
    assert torch.equal(ours.layers[0].feed_forward.w1.weight, ref.dequantize(torch.float32))
    # transformers (with accelerate) loads the format, dequantizing it on CPU
    theirs = _hf(tmp_path / "mx")
    idx = _batch(source)
    with torch.no_grad():
        assert (theirs(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-4


def test_sharded_export_has_an_index_and_loads(source, tmp_path):
    res = export(source, tmp_path / "sh", fmt="hf", dtype="fp32", max_shard_bytes=100_000)
    assert len(res["files"]) > 2
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(res["files"])
    idx = _batch(source)
    with torch.no_grad():
        a = _hf(tmp_path / "sh")(idx).logits
        b = load_pretrained(tmp_path / "sh")(idx)[0]
    assert (a - b).abs().max().item() <= 1e-4


def test_round_trip_is_bit_identical_and_a_transformers_directory_loads(source, tmp_path):
    export(source, tmp_path / "hf", fmt="hf", dtype="fp32")
    back = read_pretrained(tmp_path / "hf")
    assert back.model_cfg == source.model_cfg
    assert set(back.weights) == set(source.weights)
    for name, t in source.weights.items():
        assert torch.equal(back.weights[name], t), name
    # a directory transformers itself wrote
    _hf(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    again = read_pretrained(tmp_path / "resaved")
    for name, t in source.weights.items():
        assert torch.equal(again.weights[name], t), name


def test_export_refuses_bad_requests(source, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        export(source, tmp_path / "full")
    with pytest.raises(UserError, match="unknown export format 'gguf'"):
        export(source, tmp_path / "new", fmt="gguf")
    assert not (tmp_path / "new").exists()


def test_llama_config_refuses_what_the_model_cannot_compute():
    base = llama.hf_config(golden_cfg(), dtype=torch.float32, bos_id=0, eos_id=0)
    assert llama.model_config(base) == golden_cfg()
    for change, message in (
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling"),
        ({"model_type": "mistral"}, "not 'llama'"),
        ({"head_dim": 16}, "head_dim"),
    ):
        with pytest.raises(UserError, match=message):
            llama.model_config({**base, **change})


def golden_cfg():
    return load_config(None, golden.OVERRIDES).model.build()


def test_mx_weight_is_the_fprop_quantization():
    w = torch.randn(64, 96) * torch.logspace(-3, 3, 96)
    data, scale = mx_weight(w, "floor")
    ref = quantize(w, "e4m3", dim=-1, scale_rule="floor")
    assert torch.equal(data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(scale.view(torch.uint8), ref.scale.view(torch.uint8))


def test_init_from_an_export_starts_from_its_weights_shape_and_tokenizer(source, tmp_path,
                                                                         data_cache):  # fmt: skip
    from mxfp8.config.fields import ConfigError
    from mxfp8.train.hooks import TrainHook

    class Initial(TrainHook):
        def on_train_start(self, ctx):
            self.weights = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}

    export(source, tmp_path / "hf", fmt="hf", dtype="fp32")
    base = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "recipe.name": "bf16",
            "run.init_from": str(tmp_path / "hf"), "run.steps": 1}  # fmt: skip
    for key in [k for k in base if k.startswith("model.")]:
        del base[key]  # the directory gives the shape
    hook = Initial()
    result = train(load_config(None, {**base, "run.out": str(tmp_path / "run")}), hooks=[hook])
    assert result.completed
    for name, t in source.weights.items():  # the run started from the export, bit for bit
        assert torch.equal(hook.weights[name], t), name
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.model.build() == source.model_cfg
    assert saved.data.tokenizer == str(tmp_path / "hf" / "tokenizer.json")
    clash = {**base, "model.d_model": 96, "run.out": str(tmp_path / "clash")}
    with pytest.raises(ConfigError, match=r"model.d_model = 96 \(the directory has 64\)"):
        train(load_config(None, clash))
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        train(load_config(None, {**base, "run.out": str(tmp_path / "notok")}))


def test_init_from_checks_the_vocabulary_against_the_tokenizer(source, tmp_path, data_cache):
    """A directory whose model has fewer token ids than its tokenizer is refused, naming both."""
    from safetensors.torch import load_file, save_file

    from mxfp8.config.fields import ConfigError

    export(source, tmp_path / "hf", fmt="hf", dtype="fp32")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["vocab_size"] = 300
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = tensors[name][:300].contiguous()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    over = {**{k: v for k, v in golden.OVERRIDES.items() if not k.startswith("model.")},
            "data.cache_dir": str(data_cache), "run.init_from": str(tmp_path / "hf"),
            "run.out": str(tmp_path / "run")}  # fmt: skip
    with pytest.raises(ConfigError, match="model.vocab_size 300 < the tokenizer's 512"):
        train(load_config(None, over))
