"""Multiple-choice evaluation, scored the way lm-eval scores ``multiple_choice`` tasks.

For each item and each choice, the request is (context, continuation) with continuation =
the task's delimiter + choice (``" "``, lm-eval's default target delimiter, for task files),
split as lm-eval's Hugging Face model
splits it: trailing whitespace of the context moves to the front of the continuation, then
``context + continuation`` is encoded whole and the continuation's tokens are those after the
context's. The score of a choice is the summed log-probability of its continuation tokens.

- ``acc``: the share of items whose highest-scoring choice is the label;
- ``acc_norm``: the same with each score divided by the choice's length in characters;
- ``acc_mutual_info``: the same with each score minus the choice's unconditional score (its
  continuation after an empty context, i.e. the document separator), lm-eval's metric of that
  name: how much more likely the context makes each choice. A model that ranks choices by
  their own fluency scores chance on it; the built-in ``cloze`` task, whose choices are all
  real lines of the corpus, is read by this metric;
- each with its standard error, ``std(ddof=1) / sqrt(n)`` of the per-item 0/1 outcomes, as
  lm-eval reports it.

A task is a JSONL file, one item per line: ``{"context": str, "choices": [str, ...],
"label": int}``; lines with ``"split": "dev"`` are the few-shot pool. With ``num_fewshot`` K,
each item's prompt starts with K dev items (drawn with a seed fixed per item), each written
as its context, the delimiter and its correct choice, separated by blank lines.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from mxfp8.data.tokenizer import eot_id
from mxfp8.errors import UserError
from mxfp8.layers.recipe import Recipe
from mxfp8.model.transformer import Transformer, inference_forward

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass
class Task:
    name: str
    items: list[Item]
    dev: list[Item] = field(default_factory=list)
    delimiter: str = TARGET_DELIMITER  # between a context and each choice


def load_jsonl(path: str | Path, name: str | None = None) -> Task:
    """A task file (see the module doc); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no task file at {path}")
    items, dev = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: each line must be an object")
        ctx, choices, label = row.get("context"), row.get("choices"), row.get("label")
        if not isinstance(ctx, str):
            raise UserError(f"{where}: 'context' must be a string")
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c for c in choices)):  # fmt: skip
            raise UserError(f"{where}: 'choices' must be a list of two or more non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UserError(f"{where}: 'label' must be an index into 'choices', got {label!r}")
        item = Item(ctx, tuple(choices), label)
        (dev if row.get("split") == "dev" else items).append(item)
    if not items:
        raise UserError(f'{path}: no items (lines without "split": "dev")')
    return Task(name or path.stem, items, dev)


def split_request(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's split: trailing whitespace of the context joins the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    return context, continuation


def encode_pair(tok: Tokenizer, context: str, continuation: str,
                eot: int | None = None) -> tuple[list[int], list[int]]:  # fmt: skip
    """(context ids, continuation ids) as lm-eval encodes a request; an empty context is the
    document separator ``eot`` (lm-eval's prefix token)."""
    if context == "" and eot is not None:
        return [eot], tok.encode(continuation).ids
    context, continuation = split_request(context, continuation)
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids
    return ctx, whole[len(ctx) :]


def fewshot_prompt(task: Task, index: int, k: int, seed: int) -> str:
    """The context of item ``index`` with ``k`` dev examples before it."""
    item = task.items[index]
    if k == 0:
        return item.context
    if len(task.dev) < k:
        raise UserError(f"task {task.name}: --num-fewshot {k} but only {len(task.dev)} dev items")
    shots = random.Random(seed * 1_000_003 + index).sample(task.dev, k)
    parts = [s.context + task.delimiter + s.choices[s.label] for s in shots]
    return FEWSHOT_DELIMITER.join([*parts, item.context])


@torch.no_grad()
def loglikelihoods(model: Transformer, requests: list[tuple[list[int], list[int]]],
                   batch_size: int = 16, *, recipe: Recipe | None = None,
                   ) -> list[tuple[float, bool]]:  # fmt: skip
    """(summed log-probability of the continuation, whether it is the greedy one) for each
    (context ids, continuation ids); the context is cut on the left to fit max_seq_len. The
    forward is :func:`~mxfp8.model.transformer.inference_forward` under ``recipe`` (the run's
    recipe, as for the loss; bf16 autocast when None)."""
    limit = model.cfg.max_seq_len
    device = model.tok_embeddings.weight.device
    out: list[tuple[float, bool]] = []
    for b in range(0, len(requests), batch_size):
        chunk = requests[b : b + batch_size]
        seqs = []
        for ctx, cont in chunk:
            if not cont:
                raise UserError("a continuation encodes to no tokens")
            ids = (ctx + cont)[-(limit + 1) :]
            seqs.append(ids)
        width = max(len(s) - 1 for s in seqs)
        x = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            x[i, : len(s) - 1] = torch.tensor(s[:-1])
        logits, _ = inference_forward(model, x, recipe=recipe)
        logp = F.log_softmax(logits.float(), dim=-1)
        for i, ((_, cont), s) in enumerate(zip(chunk, seqs, strict=True)):
            n = len(cont)
            pos = torch.arange(len(s) - 1 - n, len(s) - 1, device=device)
            target = torch.tensor(s[-n:], device=device)
            rows = logp[i, pos]
            out.append((float(rows.gather(1, target[:, None]).sum()),
                        bool(torch.equal(rows.argmax(-1), target))))  # fmt: skip
    return out


def _stderr(hits: list[float]) -> float:
    n = len(hits)
    if n < 2:
        return float("nan")
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


def evaluate_task(model: Transformer, tok: Tokenizer, task: Task, *, num_fewshot: int = 0,
                  limit: int | None = None, seed: int = 1234, batch_size: int = 16,
                  recipe: Recipe | None = None) -> dict[str, Any]:  # fmt: skip
    """acc, acc_norm, acc_mutual_info and their standard errors over the task's items (the
    first ``limit``), the model under ``recipe`` (see :func:`loglikelihoods`)."""
    if num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    n_items = len(task.items) if limit is None else min(limit, len(task.items))
    if n_items < 1:
        raise UserError("--limit must be >= 1")
    eot = eot_id(tok)  # an empty context is the document separator, as lm-eval has it
    requests = []
    for i in range(n_items):
        ctx = fewshot_prompt(task, i, num_fewshot, seed)
        for c in task.items[i].choices:
            requests.append(encode_pair(tok, ctx, task.delimiter + c, eot))
    # each distinct choice once after the empty context, for acc_mutual_info
    distinct = sorted({c for i in range(n_items) for c in task.items[i].choices})
    uncond = loglikelihoods(model, [encode_pair(tok, "", task.delimiter + c, eot)
                                    for c in distinct], batch_size, recipe=recipe)  # fmt: skip
    prior = {c: u[0] for c, u in zip(distinct, uncond, strict=True)}
    scores = loglikelihoods(model, requests, batch_size, recipe=recipe)
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_mutual_info": []}
    k = 0
    for i in range(n_items):
        item = task.items[i]
        lls = [scores[k + j][0] for j in range(len(item.choices))]
        k += len(item.choices)
        ranked = {
            "acc": lls,
            "acc_norm": [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)],
            "acc_mutual_info": [ll - prior[c] for ll, c in zip(lls, item.choices, strict=True)],
        }
        for metric, values in ranked.items():
            best = max(range(len(values)), key=values.__getitem__)
            hits[metric].append(float(best == item.label))
    out: dict[str, Any] = {"task": task.name, "items": n_items, "num_fewshot": num_fewshot}
    for metric, h in hits.items():
        out[metric] = sum(h) / n_items
        out[f"{metric}_stderr"] = _stderr(h)
    out["chance"] = sum(1 / len(task.items[i].choices) for i in range(n_items)) / n_items
    return out


# --- the built-in task: cloze over held-out lines --------------------------------------------

CLOZE = "cloze"
CLOZE_MAX_TOKENS = 400_000  # of the split decoded to build it: plenty for 1000 items
CLOZE_MIN_CHARS = 20  # lines shorter than this (speaker tags, blank lines) are not candidates


def cloze_task(text: str, *, n_items: int = 1000, context_lines: int = 4, n_choices: int = 4,
               seed: int = 0) -> Task:  # fmt: skip
    """Items from held-out text: a passage of ``context_lines`` consecutive lines, and
    ``n_choices`` candidate next lines: the true one and others drawn from elsewhere in the
    text (never the lines around the passage, never a copy of the true line). Deterministic
    given ``seed``. The continuation is the candidate after a newline (delimiter ``\\n``)."""
    lines = [ln.rstrip() for ln in text.splitlines() if len(ln.strip()) >= CLOZE_MIN_CHARS]
    if len(lines) < context_lines + n_choices + 8:
        raise UserError(f"the held-out text has {len(lines)} usable lines: too few for a cloze "
                        "task (a larger validation split is needed)")  # fmt: skip
    rng = random.Random(seed)
    starts = list(range(len(lines) - context_lines))
    rng.shuffle(starts)
    items = []
    for s in starts:
        if len(items) == n_items:
            break
        true = lines[s + context_lines]
        near = set(range(s - 2, s + context_lines + 3))
        pool = [i for i in rng.sample(range(len(lines)), min(len(lines), 64)) if i not in near]
        others: list[str] = []
        for i in pool:
            if lines[i] != true and lines[i] not in others:
                others.append(lines[i])
            if len(others) == n_choices - 1:
                break
        if len(others) < n_choices - 1:
            continue
        label = rng.randrange(n_choices)
        choices = others[:label] + [true] + others[label:]
        items.append(Item("\n".join(lines[s : s + context_lines]), tuple(choices), label))
    return Task(CLOZE, items, delimiter="\n")


def _specs(specs: str) -> list[str]:
    return [t.strip() for t in specs.split(",") if t.strip()]


def task_names(specs: str) -> set[str]:
    """The names the tasks of a ``--tasks`` value get (a task file's is its stem)."""
    return {s if s == CLOZE else Path(s).stem for s in _specs(specs)}


def resolve(specs: str, tokenizer: Tokenizer, tokens) -> list[Task]:
    """The tasks of a ``--tasks`` value: ``cloze`` (built from the evaluated split ``tokens``)
    and JSONL task files, comma-separated."""
    out = []
    for spec in _specs(specs):
        if spec == CLOZE:
            out.append(cloze_task(tokenizer.decode(tokens[:CLOZE_MAX_TOKENS].tolist())))
        else:
            out.append(load_jsonl(spec))
    if not out:
        raise UserError(f"no task in {specs!r}")
    return out


def evaluate_tasks(model: Transformer, tok: Tokenizer, specs: str, tokens,
                   **kwargs: Any) -> dict[str, dict[str, Any]]:  # fmt: skip
    """task name -> :func:`evaluate_task` for each task of ``specs`` (see :func:`resolve`)."""
    return {t.name: evaluate_task(model, tok, t, **kwargs) for t in resolve(specs, tok, tokens)}
