"""The lm-eval adapter: a local multiple-choice task run through lm-eval's own evaluator with
the ``mxfp8`` model gives the same acc, acc_norm and acc_mutual_info as ``mxfp8 eval --tasks``."""

from __future__ import annotations

import json

import lm_eval  # noqa: F401 - a dev extra: missing, the suite fails (never skips)
import pytest

from mxfp8.config.train_config import load_config
from mxfp8.train import golden
from mxfp8.train.loop import train

TASK_YAML = """\
task: mxfp8_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_mutual_info
"""


def test_lm_eval_scores_equal_mxfp8_eval(tmp_path, data_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mxfp8.cli.main import main
    from mxfp8.interop.lm_eval_adapter import MXFP8LM

    run = tmp_path / "run"
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "recipe.name": "mxfp8",
            "run.out": str(run), "run.steps": 6}  # fmt: skip
    train(load_config(None, over))
    items = [
        {"context": "ROMEO:", "choices": ["But soft, what light", "zz qq xx", "the the the"],
         "label": 0},
        {"context": "First Citizen:\nBefore we proceed any further, hear me ",
         "choices": ["speak.", "elephant", "All:"], "label": 0},
        {"context": "To be, or not to be, that is the", "choices": ["question", "answer"],
         "label": 0},
        {"context": "KING RICHARD III:\nNow is the winter of our", "choices": ["discontent",
         "summer", "content made glorious"], "label": 1},
    ]  # fmt: skip
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(TASK_YAML.format(data=data))
    ours_json = tmp_path / "ours.json"
    assert main(["eval", str(run), "--no-lm", "--tasks", str(data), "--out", str(ours_json)]) == 0
    ours = json.loads(ours_json.read_text())["evaluations"][0]["tasks"]["items"]
    # one request per forward, here and below: under bf16 autocast a score moves by ~4e-4
    # with the padding of the batch it shares (measured), which is not what this compares
    model = MXFP8LM(path=str(run), batch_size=1)
    results = simple_evaluate(
        model=model,
        tasks=["mxfp8_local_mc"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        num_fewshot=0,
        log_samples=True,
    )
    theirs = results["results"]["mxfp8_local_mc"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert theirs["acc_stderr,none"] == pytest.approx(ours["acc_stderr"])
    assert theirs["acc_mutual_info,none"] == pytest.approx(ours["acc_mutual_info"])
    assert ours["items"] == 4 and 0 < ours["acc"]
    # the documented command line: lm-eval's own CLI, with the model registered
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mxfp8.interop.lm_eval_adapter", "--model", "mxfp8",
           "--model_args", f"path={run}", "--tasks", "mxfp8_local_mc", "--include_path",
           str(tmp_path / "tasks")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    row = next(ln for ln in res.stdout.splitlines() if "mxfp8_local_mc" in ln)
    cells = [c.strip() for c in row.split("|")]
    assert float(cells[cells.index("acc") + 2]) == pytest.approx(ours["acc"], abs=1e-4)
    # per choice, not only on average: lm-eval's logged log-likelihoods against ours
    from mxfp8.interop import tasks as mc

    tok = model.loaded.tokenizer
    for sample in results["samples"]["mxfp8_local_mc"]:
        item = items[sample["doc_id"]]
        pairs = [mc.encode_pair(tok, item["context"], " " + c) for c in item["choices"]]
        # acc_mutual_info: each choice again after the empty context (the separator)
        pairs += [mc.encode_pair(tok, "", " " + c, mc.eot_id(tok)) for c in item["choices"]]
        want = [mc.loglikelihoods(model.loaded.model, [p])[0] for p in pairs]
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx([w for w, _ in want], abs=1e-5)


class _Req:
    def __init__(self, *args):
        self.args = args


def test_rolling_loglikelihood_predicts_each_token_once(tmp_path, data_cache):
    import torch
    import torch.nn.functional as F

    from mxfp8.interop.lm_eval_adapter import MXFP8LM

    run = tmp_path / "run"
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "recipe.name": "bf16",
            "run.out": str(run), "run.steps": 2, "run.eval_every": 0}  # fmt: skip
    train(load_config(None, over))
    lm = MXFP8LM(path=str(run))
    model, tok = lm.loaded.model, lm.loaded.tokenizer
    limit = model.cfg.max_seq_len
    text = "Now is the winter of our discontent made glorious summer. " * 20
    ids = tok.encode(text).ids
    assert len(ids) > 2 * limit  # several windows
    # independent: lm-eval's rolling windows (its LM docstring), one plain forward each:
    # chunks of `limit` predictions, each window as long as fits, every token scored once
    seq = [lm.eot, *ids]
    want, scored = 0.0, 0
    with torch.no_grad(), lm.loaded.run_recipe.autocast("cpu"):  # the run's own forward
        for start in range(0, len(ids), limit):
            end = min(start + limit, len(ids))
            window = torch.tensor([seq[max(0, end - limit) : end + 1]])
            logp = F.log_softmax(model(window[:, :-1])[0][0].float(), -1)
            targets = window[0, 1:]
            n = end - start
            want += float(logp[-n:].gather(1, targets[-n:, None]).sum())
            scored += n
    assert scored == len(ids)
    (got,) = lm.loglikelihood_rolling([_Req(text)])
    assert got == pytest.approx(want, abs=1e-3)
    short = "To be, or not to be"
    (s,) = lm.loglikelihood_rolling([_Req(short)])
    (pair,) = lm.loglikelihood([_Req("", short)])
    assert s == pytest.approx(pair[0], abs=1e-4)  # one window: the document separator, then it
    (out,) = lm.generate_until([_Req("ROMEO:", {"until": ["\n\n"], "max_gen_toks": 8})])
    assert isinstance(out, str) and "\n\n" not in out


# --- not circular: lm-eval's own Hugging Face model on the exported run ---------------------

# the last context is longer than the model's 256 positions: both sides cut it on the left
LONG = "All the world's a stage, and all the men and women merely players. " * 12
HF_ITEMS = [
    {"context": "ROMEO:", "choices": ["But soft, what light", "zz qq xx", "the the the"],
     "label": 0},
    {"context": "First Citizen:\nBefore we proceed any further, hear me ",  # trailing space
     "choices": ["speak.", "elephant", "All:"], "label": 0},
    {"context": "To be, or not to be, that is the", "choices": ["question", "answer"],
     "label": 0},
    {"context": "KING RICHARD III:\nNow is the winter of our", "choices": ["discontent",
     "summer", "content made glorious"], "label": 1},
    {"context": LONG + "They have their", "choices": ["exits", "entrances"], "label": 0},
]  # fmt: skip


def test_lm_eval_hf_model_on_the_export_scores_as_mxfp8_eval(tmp_path, data_cache, monkeypatch):
    """A run trained in fp32 (no autocast) is exported to a transformers directory (fp32) and
    scored by lm-eval's own ``hf`` model (HFLM: transformers' Llama, lm-eval's tokenization,
    prefix token, truncation and scoring), offline, on a local task; ``mxfp8 eval --tasks``
    scores the run itself. acc, acc_norm, acc_mutual_info and every request's log-likelihood
    (the unconditional ones after the document separator included) agree within 1e-4
    (measured: 7.6e-6 at most), and so do the token ids of every request. Nothing of the
    adapter is involved."""
    import datasets
    import huggingface_hub
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mxfp8.cli.main import main
    from mxfp8.data.tokenizer import eot_id
    from mxfp8.interop import tasks as mc
    from mxfp8.interop.source import open_model

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # read at import time: set where the libraries look, whatever imported them first
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "recipe.name": "fp32",
            "run.out": str(run), "run.steps": 6, "run.eval_every": 0}  # fmt: skip
    train(load_config(None, over))
    assert main(["export", str(run), "--format", "hf", "--dtype", "fp32", "--out",
                 str(hf_dir)]) == 0  # fmt: skip
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(i) for i in HF_ITEMS) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(TASK_YAML.format(data=data))

    # ours: `mxfp8 eval --tasks` on the run, every request it scores recorded on the way
    scored: dict[tuple, tuple[float, bool]] = {}
    original = mc.loglikelihoods

    def spy(model, requests, *args, **kw):
        out = original(model, requests, *args, **kw)
        scored.update({(tuple(c), tuple(k)): r for (c, k), r in zip(requests, out, strict=True)})
        return out

    monkeypatch.setattr(mc, "loglikelihoods", spy)
    ours_json = tmp_path / "ours.json"
    assert main(["eval", str(run), "--no-lm", "--tasks", str(data), "--out", str(ours_json)]) == 0
    ours = json.loads(ours_json.read_text())["evaluations"][0]["tasks"]["items"]
    monkeypatch.setattr(mc, "loglikelihoods", original)

    # theirs: lm-eval's HFLM loads the exported directory (model and tokenizer) itself
    lm = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), device="cpu", dtype="float32",
              batch_size=4)  # fmt: skip
    assert next(lm.model.parameters()).dtype == torch.float32
    results = simple_evaluate(model=lm, tasks=["mxfp8_local_mc"], num_fewshot=0,
                              task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                              log_samples=True)  # fmt: skip
    theirs = results["results"]["mxfp8_local_mc"]
    assert ours["items"] == len(HF_ITEMS)
    for metric in ("acc", "acc_norm", "acc_mutual_info"):
        assert theirs[f"{metric},none"] == pytest.approx(ours[metric], abs=1e-4), metric
        assert theirs[f"{metric}_stderr,none"] == pytest.approx(ours[f"{metric}_stderr"],
                                                                abs=1e-4)  # fmt: skip

    # the document separator: lm-eval's prefix token for an empty context is the
    # tokenizer's BOS, which the export declares as the end-of-text token, our prefix
    our_tok = open_model(run).tokenizer
    eot = eot_id(our_tok)
    assert lm.prefix_token_id == lm.tokenizer.bos_token_id == eot
    assert lm.max_length == 256  # the model's positions: where both sides truncate
    worst, n_requests = 0.0, 0
    for sample in results["samples"]["mxfp8_local_mc"]:
        item = HF_ITEMS[sample["doc_id"]]
        n_choices = len(item["choices"])
        assert len(sample["arguments"]) == 2 * n_choices  # conditional, then unconditional
        for (ctx, cont), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ll, greedy = float(resp[0][0]), bool(resp[0][1])
            # the token ids lm-eval scores (its own split and prefix) are ours
            if ctx == "":
                theirs_ids = ([lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False))
            else:
                theirs_ids = lm._encode_pair(ctx, cont)
            key = tuple(map(tuple, mc.encode_pair(our_tok, ctx, cont, eot)))
            assert tuple(map(tuple, theirs_ids)) == key, (ctx[-40:], cont)
            want_ll, want_greedy = scored[key]
            assert ll == pytest.approx(want_ll, abs=1e-4), (ctx[-40:], cont)
            assert greedy == want_greedy, (ctx[-40:], cont)
            worst = max(worst, abs(ll - want_ll))
            n_requests += 1
    assert n_requests == 2 * sum(len(i["choices"]) for i in HF_ITEMS)
    assert worst < 1e-4
