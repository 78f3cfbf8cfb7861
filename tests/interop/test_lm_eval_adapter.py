"""The lm-eval adapter: a local multiple-choice task run through lm-eval's own evaluator with
the ``mxfp8`` model gives the same acc, acc_norm and acc_mutual_info as ``mxfp8 eval --tasks``."""

from __future__ import annotations

import json

import lm_eval  # noqa: F401 - a dev extra: missing, the suite fails (never skips)
import pytest

from mxfp8.train import golden
from mxfp8.train.config import load_config
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
    model = MXFP8LM(path=str(run))
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
        want = mc.loglikelihoods(model.loaded.model, [mc.encode_pair(tok, item["context"], " " + c)
                                                      for c in item["choices"]])  # fmt: skip
        # acc_mutual_info: each choice again after the empty context (the separator)
        want += mc.loglikelihoods(model.loaded.model, [mc.encode_pair(tok, "", " " + c,
                                                                      mc.eot_id(tok))
                                                       for c in item["choices"]])  # fmt: skip
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
    with torch.no_grad():
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
