"""``mxfp8 eval RUN_OR_DIR``: validation loss, perplexity and bits per byte of a trained model.

The data default to the run's validation split (for a model directory that ``mxfp8 export``
wrote, the split of the run it came from); ``--data SOURCE`` evaluates on another corpus,
tokenized with the model's own tokenizer (its validation split). The model runs under its
training recipe, or ``--recipe NAME``: a bf16-trained model under ``mxfp8`` measures what MX
inference costs. Results are printed and appended to ``eval.json`` in the run (or model)
directory.

``--tasks NAME_OR_JSONL[,...]`` adds multiple-choice tasks, scored as lm-eval scores them
(``acc``, ``acc_norm``, standard errors; docs/interop.md): a JSONL task file, or ``cloze``,
built from the evaluated split itself (a passage of held-out lines and four candidate next
lines), so it works offline for any corpus. ``--num-fewshot K`` and ``--limit N`` as in
lm-eval.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="validation loss, perplexity and bits per byte of a trained model",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("path", type=Path, help="a run directory, a checkpoint directory, or a "
                   "model directory (mxfp8 export, or transformers' save_pretrained)")  # fmt: skip
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step of RUN")
    p.add_argument("--data", default=None, help="evaluate on this corpus (data.source syntax)")
    p.add_argument("--recipe", default=None, help="run the model under this named recipe")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the "
                   "run's seq_len, else the model's max_seq_len)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most N tokens")
    p.add_argument("--out", type=Path, default=None, help="results file (default: eval.json "
                   "in the run or model directory)")  # fmt: skip
    p.add_argument("--tasks", default=None, help="multiple-choice tasks: cloze and/or JSONL "
                   "files, comma-separated")  # fmt: skip
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="score at most N items per task")
    p.add_argument("--no-lm", action="store_true", help="skip the loss/perplexity pass")
    return p


def _print_tasks(results: dict) -> None:
    for name, r in results.items():
        print(
            f"  {name}: acc {r['acc']:.4f} +- {r['acc_stderr']:.4f}, acc_norm "
            f"{r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f}, acc_mutual_info "
            f"{r['acc_mutual_info']:.4f} +- {r['acc_mutual_info_stderr']:.4f} "
            f"({r['items']} items, {r['num_fewshot']}-shot; chance {r['chance']:.2f})"
        )


def run(args: argparse.Namespace) -> int:
    from mxfp8.interop.evaluate import append_evaluation, evaluate_lm
    from mxfp8.interop.source import eval_split, open_model
    from mxfp8.interop.tasks import evaluate_tasks
    from mxfp8.layers.recipe import recipe as named_recipe

    loaded = open_model(args.path, step=args.step, recipe=args.recipe)
    tokens, what = eval_split(loaded, args.data)
    seq_len = args.seq_len
    if seq_len is None:
        run_cfg = loaded.run_config
        seq_len = run_cfg.run.seq_len if run_cfg is not None else loaded.model.cfg.max_seq_len
    t0 = time.perf_counter()
    res = {"source": loaded.source, "recipe": loaded.recipe, "data": what}
    if not args.no_lm:
        lm = evaluate_lm(loaded.model, tokens, loaded.tokenizer, seq_len=seq_len,
                         batch_size=args.batch_size, max_tokens=args.max_tokens,
                         recipe=named_recipe(loaded.recipe))  # fmt: skip
        res.update(lm)
        bpb = lm["bits_per_byte"]
        print(f"{loaded.source} under {loaded.recipe} on {what}: loss {lm['loss']:.4f}, "
              f"perplexity {lm['perplexity']:.2f}, bits/byte "
              f"{'-' if bpb is None else f'{bpb:.4f}'} ({lm['tokens']:,} tokens)")  # fmt: skip
    if args.tasks:
        res["tasks"] = evaluate_tasks(loaded.model, loaded.tokenizer, args.tasks, tokens,
                                      num_fewshot=args.num_fewshot, limit=args.limit,
                                      batch_size=args.batch_size)  # fmt: skip
        _print_tasks(res["tasks"])
    res["seconds"] = round(time.perf_counter() - t0, 2)
    out = args.out or loaded.home / "eval.json"
    append_evaluation(out, res)
    print(f"results: {out}")
    return 0
