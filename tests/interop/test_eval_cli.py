"""``mxfp8 eval``, ``mxfp8 export`` and ``mxfp8 generate`` from the command line, and the
evaluation's numbers against independent computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mxfp8.cli.main import main
from mxfp8.config.train_config import load_config
from mxfp8.data.prepare import prepare_data
from mxfp8.interop.evaluate import evaluate_lm
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer
from mxfp8.train import golden
from mxfp8.train.loop import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("run")
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "recipe.name": "bf16",
            "run.out": str(out), "run.steps": 6}  # fmt: skip
    train(load_config(None, over))
    return out


def test_uniform_model_scores_ln_vocab_and_the_bytes_of_its_targets(data_cache):
    cfg = load_config(None, {**golden.OVERRIDES, "data.cache_dir": str(data_cache)})
    data = prepare_data(cfg.data)
    model = Transformer(model_config("tiny", d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                     ffn_hidden=128, vocab_size=data.vocab_size))  # fmt: skip
    with torch.no_grad():
        model.output.weight.zero_()  # tied: every logit 0, every prediction uniform
    seq, n = 32, 10 * 32 + 5  # 10 whole windows fit in the first n + 1 tokens; 5 are left over
    tokens = np.asarray(data.val[: n + 1])
    res = evaluate_lm(model, tokens, data.tokenizer, seq_len=seq, batch_size=3)
    assert res["windows"] == 10 and res["tokens"] == 320
    assert res["loss"] == pytest.approx(math.log(data.vocab_size), rel=1e-6)
    assert res["perplexity"] == pytest.approx(data.vocab_size, rel=1e-5)
    n_bytes = len(data.tokenizer.decode(tokens[1:321].tolist()).encode())  # the 320 targets
    assert res["bytes"] == n_bytes
    assert res["bits_per_byte"] == pytest.approx(320 * math.log2(data.vocab_size) / n_bytes)


def test_eval_of_a_run_under_its_recipe_and_another(run_dir, capsys):
    assert main(["eval", str(run_dir), "--max-tokens", "2048"]) == 0
    assert main(["eval", str(run_dir), "--max-tokens", "2048", "--recipe", "mxfp8"]) == 0
    out = capsys.readouterr().out
    assert "under bf16" in out and "under mxfp8" in out
    evals = json.loads((run_dir / "eval.json").read_text())["evaluations"]
    bf16, mx = evals[-2], evals[-1]
    assert bf16["recipe"] == "bf16" and mx["recipe"] == "mxfp8"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert abs(bf16["loss"] - summary["final_val_loss"]) < 0.1  # other windows, same model
    assert bf16["loss"] != mx["loss"] and abs(bf16["loss"] - mx["loss"]) < 0.05
    assert 0 < bf16["bits_per_byte"] < 8


def test_export_then_eval_and_generate_the_directory(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--out", str(out), "--dtype", "fp32"]) == 0
    assert (out / "config.json").is_file()
    assert (
        main(["eval", str(run_dir), "--max-tokens", "1024", "--out", str(tmp_path / "a.json")]) == 0
    )
    assert main(["eval", str(out), "--max-tokens", "1024"]) == 0  # the export names its run
    a = json.loads((tmp_path / "a.json").read_text())["evaluations"][0]
    b = json.loads((out / "eval.json").read_text())["evaluations"][0]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)  # same weights, same windows
    capsys.readouterr()
    args = ["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "12"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:\n")
    assert main([args[0], str(run_dir), *args[2:]]) == 0  # the run itself: the same text
    assert capsys.readouterr().out == text


def test_eval_and_export_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(run_dir)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--prompt", "x", "--top-p", "2"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_eval_on_another_corpus_uses_the_models_tokenizer(run_dir, tmp_path, capsys):
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n".join(f"Line {i}: to be or not to be, that is the question."
                                 for i in range(3000)))  # fmt: skip
    out = tmp_path / "e.json"
    assert main(["eval", str(run_dir), "--data", str(corpus), "--max-tokens", "1024",
                 "--out", str(out)]) == 0  # fmt: skip
    (e,) = json.loads(out.read_text())["evaluations"]
    assert e["data"] == f"{corpus} (validation split)" and e["tokens"] == 1024
    # the same numbers from the corpus prepared explicitly with the run's tokenizer (a BPE
    # trained on this corpus instead would give other ids, hence another loss)
    from mxfp8.data.prepare import DataConfig
    from mxfp8.interop.source import open_model

    loaded = open_model(run_dir)
    data = prepare_data(DataConfig(source=str(corpus), tokenizer=str(loaded.tokenizer_path),
                                   cache_dir=str(tmp_path / "cache")))  # fmt: skip
    want = evaluate_lm(loaded.model, data.val, data.tokenizer, seq_len=32, max_tokens=1024)
    assert e["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert e["bits_per_byte"] == pytest.approx(want["bits_per_byte"], abs=1e-6)


def test_bits_per_byte_counts_a_character_split_by_a_window_edge_once(data_cache):
    """Each "é" is two bytes and, in this 512-token byte-level BPE trained on Shakespeare,
    two tokens; with 3-token windows some characters start in one window and end in the next.
    Decoded window by window, each half would count as a 3-byte replacement character."""
    cfg = load_config(None, {**golden.OVERRIDES, "data.cache_dir": str(data_cache)})
    tok = prepare_data(cfg.data).tokenizer
    ids = tok.encode("a" + "é" * 30).ids
    assert len(ids) == 61  # "a", then two byte tokens per "é"
    tokens = np.asarray(ids)
    model = Transformer(model_config("tiny", d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                     ffn_hidden=128, vocab_size=tok.get_vocab_size()))  # fmt: skip
    res = evaluate_lm(model, tokens, tok, seq_len=3, batch_size=4)
    assert res["tokens"] == 60 and res["bytes"] == 60  # 30 characters of 2 bytes
    per_window = sum(len(tok.decode(ids[i + 1 : i + 4]).encode()) for i in range(0, 60, 3))
    assert per_window != 60  # what decoding each window on its own counted


def _val_losses(run_dir):
    from mxfp8.train.runlog import read_metrics

    return {m["step"]: m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m}


def test_eval_runs_an_overridden_recipe_as_its_run_did(tmp_path, data_cache, capsys):
    """A run whose recipe is more than its preset's name: a changed field (the floor scale
    rule), the first block kept in bf16 and one layer under another preset. ``mxfp8 eval
    --val-batches`` of each checkpoint gives the val_loss the run logged at that step, bit for
    bit; the preset by its name alone (what eval used to rebuild) gives another number."""
    out = tmp_path / "run"
    layer = {"pattern": "layers.1.feed_forward.w2", "recipe": "mxfp8-e5m2-grads"}
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "run.out": str(out),
            "recipe.name": "mxfp8", "recipe.scale_rule": "floor", "recipe.keep_first_blocks": 1,
            "recipe.overrides": [layer], "run.steps": 6, "run.eval_every": 3,
            "run.ckpt_every": 3}  # fmt: skip
    train(load_config(None, over))
    logged = _val_losses(out)
    assert set(logged) == {3, 6}
    for step in (3, 6):
        assert main(["eval", str(out), "--step", str(step), "--val-batches"]) == 0
    assert main(["eval", str(out), "--val-batches", "--recipe", "mxfp8"]) == 0
    *ours, named = json.loads((out / "eval.json").read_text())["evaluations"]
    assert [e["loss"] for e in ours] == [logged[3], logged[6]]  # exactly
    assert named["loss"] != logged[6]
    e = ours[-1]
    assert e["recipe"] == "mxfp8" and e["recipe_is_the_runs"] is True
    fields = e["recipe_fields"]
    assert fields["scale_rule"] == "floor" and fields["keep_first_blocks"] == 1
    assert fields["overrides"] == [layer]
    assert named["recipe_is_the_runs"] is False and named["recipe_fields"]["scale_rule"] == "rceil"
    # the whole split and the tasks run under the same recipe (its autocast included)
    from mxfp8.interop.source import open_model

    loaded = open_model(out)
    assert loaded.run_recipe == load_config(out / "config.toml").recipe.build()
    w2 = loaded.model.get_submodule("layers.1.feed_forward.w2")
    assert w2.recipe.name == "mxfp8-e5m2-grads"
    assert type(loaded.model.get_submodule("layers.0.attention.wq")) is torch.nn.Linear  # kept
    capsys.readouterr()
