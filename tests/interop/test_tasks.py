"""Multiple-choice scoring as lm-eval scores it: the request split, the sums, acc, acc_norm
and acc_mutual_info with their standard errors, the task file format, and the built-in
cloze task."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mxfp8.config.train_config import load_config
from mxfp8.data.prepare import prepare_data
from mxfp8.errors import UserError
from mxfp8.interop import tasks as mc
from mxfp8.layers.recipe import recipe
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer
from mxfp8.train import golden


@pytest.fixture(scope="module")
def data(data_cache):
    return prepare_data(load_config(None, {**golden.OVERRIDES,
                                           "data.cache_dir": str(data_cache)}).data)  # fmt: skip


@pytest.fixture(scope="module")
def model(data):
    torch.manual_seed(0)
    m = Transformer(model_config("tiny", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                 ffn_hidden=128, vocab_size=data.vocab_size, max_seq_len=48,
                                 tie_embeddings=False))  # fmt: skip
    with torch.no_grad():
        m.output.weight.mul_(10)  # sharper than the init, so choices differ in score
    return m.eval()


def test_trailing_space_moves_into_the_continuation(data):
    assert mc.split_request("Q: who? ", " Romeo") == ("Q: who?", "  Romeo")
    assert mc.split_request("Q: who?", " Romeo") == ("Q: who?", " Romeo")
    tok = data.tokenizer
    ctx, cont = mc.encode_pair(tok, "To be, or not ", "to be")
    assert ctx == tok.encode("To be, or not").ids
    assert ctx + cont == tok.encode("To be, or not to be").ids
    assert mc.encode_pair(tok, "", "to be", eot=0) == ([0], tok.encode("to be").ids)


def _direct_sum(model, ctx, cont, bf16=False):
    """The continuation's summed log-probability from one plain forward of its own (under
    bf16 autocast with ``bf16``)."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logp = F.log_softmax(model(ids[:, :-1])[0].float(), -1)[0]
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


TEXTS = [("ROMEO:", " But soft"), ("First Citizen:\nBefore we", " proceed any further"),
         ("A", " b"), ("long " * 30, " tail that is cut on the left")]  # fmt: skip


def test_batched_scores_equal_one_forward_per_request(model, data):
    reqs = [mc.encode_pair(data.tokenizer, c, x) for c, x in TEXTS]
    got = mc.loglikelihoods(model, reqs, batch_size=3, recipe=recipe("fp32"))
    for (ctx, cont), (ll, _) in zip(reqs, got, strict=True):
        keep = (ctx + cont)[-(model.cfg.max_seq_len + 1) :]
        want = _direct_sum(model, keep[: len(keep) - len(cont)], cont)
        assert ll == pytest.approx(want, abs=1e-4)


def test_task_scores_run_under_the_recipes_autocast(model, data):
    """A bf16 recipe scores under bf16 autocast, as its loss is evaluated and as it trained
    (task scoring used to run in fp32 whatever the recipe): the sums are those of an explicit
    bf16 forward, and measurably not the fp32 ones."""
    reqs = [mc.encode_pair(data.tokenizer, c, x) for c, x in TEXTS[:3]]
    got = mc.loglikelihoods(model, reqs, batch_size=1, recipe=recipe("bf16"))
    for (ctx, cont), (ll, _) in zip(reqs, got, strict=True):
        bf16 = _direct_sum(model, ctx, cont, bf16=True)
        assert ll == pytest.approx(bf16, abs=1e-5)
        assert abs(ll - _direct_sum(model, ctx, cont)) > 1e-3


def test_acc_acc_norm_mutual_info_and_their_standard_errors(monkeypatch, model, data):
    # fixed scores: item 1 is right under acc, item 2 under acc_norm only, item 3 under both;
    # the unconditional scores flip item 1 under acc_mutual_info
    prior = {"a": -1.0, "aaa": -1.0, "b": -5.0, "bbbb": -6.0}
    cond = iter([-2.0, -4.0, -2.0, -4.0, -9.0, -1.0])
    seen = []

    def fake(m, reqs, bs, recipe=None):
        seen.append(reqs)
        if len(seen) == 1:  # the distinct choices after the empty context, in sorted order
            return [(prior[c], False) for c in sorted(prior)]
        return [(next(cond), False) for _ in reqs]

    monkeypatch.setattr(mc, "loglikelihoods", fake)
    task = mc.Task("t", [mc.Item("x", ("a", "bbbb"), 0), mc.Item("y", ("a", "bbbb"), 1),
                         mc.Item("z", ("aaa", "b"), 1)])  # fmt: skip
    tok = data.tokenizer
    r = mc.evaluate_task(model, tok, task)
    eot = mc.eot_id(tok)
    assert seen[0] == [([eot], tok.encode(" " + c).ids) for c in sorted(prior)]
    assert seen[1][0] == mc.encode_pair(tok, "x", " a")
    # norm: -2/1 < -4/4; -9/3 < -1/1. mutual info: -2+1 < -4+6; -2+1 < -4+6; -9+1 < -1+5
    want = {"acc": [1, 0, 1], "acc_norm": [0, 1, 1], "acc_mutual_info": [0, 1, 1]}
    for key, hits in want.items():
        m = sum(hits) / 3
        assert r[key] == pytest.approx(m)
        se = math.sqrt(sum((h - m) ** 2 for h in hits) / 2 / 3)
        assert r[f"{key}_stderr"] == pytest.approx(se)
    assert r["chance"] == 0.5


def test_task_file_format_and_its_errors(tmp_path, model, data):
    path = tmp_path / "t.jsonl"
    rows = [{"context": "Q1", "choices": ["a", "b"], "label": 1},
            {"context": "D1", "choices": ["c", "d"], "label": 0, "split": "dev"},
            {"context": "Q2", "choices": ["e", "f", "g"], "label": 2}]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = mc.load_jsonl(path)
    assert (task.name, len(task.items), len(task.dev)) == ("t", 2, 1)
    assert mc.fewshot_prompt(task, 1, 1, seed=0) == "D1 c\n\nQ2"
    with pytest.raises(UserError, match="only 1 dev items"):
        mc.evaluate_task(model, data.tokenizer, task, num_fewshot=2)
    for bad, message in (('{"context": "Q", "choices": ["a"], "label": 0}', "two or more"),
                         ('{"context": "Q", "choices": ["a", "b"], "label": 2}', "an index"),
                         ("[1, 2]", "must be an object"), ("{oops", "not JSON")):  # fmt: skip
        path.write_text(json.dumps(rows[0]) + "\n" + bad + "\n")
        with pytest.raises(UserError, match=f"t.jsonl:2: .*{message}"):
            mc.load_jsonl(path)


def test_cloze_items_are_deterministic_and_well_formed(data):
    text = data.tokenizer.decode(data.val[:60000].tolist())
    a = mc.cloze_task(text, n_items=50, seed=3)
    b = mc.cloze_task(text, n_items=50, seed=3)
    c = mc.cloze_task(text, n_items=50, seed=4)
    assert a.items == b.items and a.items != c.items and len(a.items) == 50
    lines = text.splitlines()
    for item in a.items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        passage = item.context.split("\n")
        true = item.choices[item.label]
        # the true line follows the passage in the held-out text (long lines only)
        long = [ln.rstrip() for ln in lines if len(ln.strip()) >= mc.CLOZE_MIN_CHARS]
        at = next(i for i in range(len(long) - 4) if long[i : i + 4] == passage)
        assert long[at + 4] == true
    assert sorted({i.label for i in a.items}) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="too few"):
        mc.cloze_task("short\n" * 50)


def test_an_empty_context_is_scored_after_the_document_separator(monkeypatch, model, data):
    """As lm-eval does: the continuation of an empty context is predicted from the separator
    (id 0 here), so its first token is scored too: without it there is no position to
    predict it from."""
    tok = data.tokenizer
    seen = []
    real = mc.loglikelihoods

    def spy(m, reqs, bs, recipe=None):
        seen.extend(reqs)
        return real(m, reqs, bs, recipe=recipe)

    monkeypatch.setattr(mc, "loglikelihoods", spy)
    task = mc.Task("t", [mc.Item("", ("ROMEO:", "zz qq"), 0)])
    mc.evaluate_task(model, tok, task)
    # the conditional requests (after the unconditional ones, which here are the same)
    assert seen[-2:] == [([0], tok.encode(" " + c).ids) for c in task.items[0].choices]
