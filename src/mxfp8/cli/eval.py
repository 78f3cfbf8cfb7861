"""``mxfp8 eval RUN_OR_DIR``: validation loss, perplexity and bits per byte of a trained model.

The data default to the run's validation split (for a model directory that ``mxfp8 export``
wrote, the split of the run it came from); ``--data SOURCE`` evaluates on another corpus,
tokenized with the model's own tokenizer (its validation split). The model runs as its run
ran it at that checkpoint (the resolved recipe with its overrides, the layers an adaptive
run had switched to bf16, the recipe's autocast), or under ``--recipe NAME``: a bf16-trained
model under ``mxfp8`` measures what MX inference costs. ``--val-batches`` evaluates the run's
own validation batches instead, and gives the ``val_loss`` the run logged at that step, bit
for bit. Results are printed and appended to ``eval.json`` in the run (or model) directory,
with the resolved recipe.

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
    p.add_argument("--val-batches", action="store_true", help="the loss on the run's own "
                   "validation batches (what its logged val_loss measures) instead of the "
                   "whole split")  # fmt: skip
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
    from mxfp8.errors import UserError
    from mxfp8.interop.evaluate import evaluate_lm, evaluate_val_batches
    from mxfp8.interop.source import eval_split, open_model
    from mxfp8.interop.tasks import evaluate_tasks

    if args.val_batches and (args.data or args.tasks or args.no_lm or args.max_tokens
                             or args.seq_len):  # fmt: skip
        raise UserError("--val-batches evaluates the run's own validation batches: it takes "
                        "no --data, --tasks, --no-lm, --max-tokens or --seq-len")  # fmt: skip
    loaded = open_model(args.path, step=args.step, recipe=args.recipe)
    under = loaded.recipe if loaded.runs_recipe else f"{loaded.recipe} (--recipe)"
    if loaded.precision_switches:
        under += f", {len(loaded.precision_switches)} layers switched to bf16"
    t0 = time.perf_counter()
    res = {"source": loaded.source, **loaded.recipe_record()}
    if args.val_batches:
        lm = evaluate_val_batches(loaded)
        res.update(data="the run's validation batches", **lm)
        print(f"{loaded.source} under {under} on its run's {lm['val_batches']} validation "
              f"batches: loss {lm['loss']:.6f}, perplexity {lm['perplexity']:.3f}")  # fmt: skip
        return _finish(args, loaded, res, t0)
    tokens, what = eval_split(loaded, args.data)
    res["data"] = what
    seq_len = args.seq_len
    if seq_len is None:
        run_cfg = loaded.run_config
        seq_len = run_cfg.run.seq_len if run_cfg is not None else loaded.model.cfg.max_seq_len
    if not args.no_lm:
        lm = evaluate_lm(loaded.model, tokens, loaded.tokenizer, seq_len=seq_len,
                         batch_size=args.batch_size, max_tokens=args.max_tokens,
                         recipe=loaded.run_recipe)  # fmt: skip
        res.update(lm)
        bpb = lm["bits_per_byte"]
        print(f"{loaded.source} under {under} on {what}: loss {lm['loss']:.4f}, "
              f"perplexity {lm['perplexity']:.2f}, bits/byte "
              f"{'-' if bpb is None else f'{bpb:.4f}'} ({lm['tokens']:,} tokens)")  # fmt: skip
    if args.tasks:
        res["tasks"] = evaluate_tasks(loaded.model, loaded.tokenizer, args.tasks, tokens,
                                      num_fewshot=args.num_fewshot, limit=args.limit,
                                      batch_size=args.batch_size,
                                      recipe=loaded.run_recipe)  # fmt: skip
        _print_tasks(res["tasks"])
    return _finish(args, loaded, res, t0)


def _finish(args: argparse.Namespace, loaded, res: dict, t0: float) -> int:
    from mxfp8.interop.evaluate import append_evaluation

    res["seconds"] = round(time.perf_counter() - t0, 2)
    out = args.out or loaded.home / "eval.json"
    append_evaluation(out, res)
    print(f"results: {out}")
    return 0
