"""``mxfp8 eval RUN_OR_DIR``: validation loss, perplexity and bits per byte of a trained model.

The data default to the run's validation split (for a model directory that ``mxfp8 export``
wrote, the split of the run it came from); ``--data SOURCE`` evaluates on another corpus,
tokenized with the model's own tokenizer (its validation split). The model runs under its
training recipe, or ``--recipe NAME``: a bf16-trained model under ``mxfp8`` measures what MX
inference costs. Results are printed and appended to ``eval.json`` in the run (or model)
directory.
"""

from __future__ import annotations

import argparse
import json
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
    return p


def _split(loaded, data: str | None):
    """(validation token ids, a description of them)."""
    import dataclasses

    from mxfp8.errors import UserError
    from mxfp8.train.data import DataConfig, prepare_data

    if data is None:
        if loaded.run_config is None:
            raise UserError(f"{loaded.source}: no run to take the validation split from: "
                            "pass --data SOURCE")  # fmt: skip
        cfg = loaded.run_config.data
        return prepare_data(cfg).val, f"{cfg.source} (the run's validation split)"
    base = loaded.run_config.data if loaded.run_config is not None else DataConfig()
    cfg = dataclasses.replace(base, source=data, tokenizer=str(loaded.tokenizer_path))
    return prepare_data(cfg).val, f"{data} (validation split)"


def run(args: argparse.Namespace) -> int:
    from mxfp8.fileio import write_text_atomically
    from mxfp8.interop.evaluate import evaluate_lm
    from mxfp8.interop.source import open_model

    loaded = open_model(args.path, step=args.step, recipe=args.recipe)
    tokens, what = _split(loaded, args.data)
    seq_len = args.seq_len
    if seq_len is None:
        run_cfg = loaded.run_config
        seq_len = run_cfg.run.seq_len if run_cfg is not None else loaded.model.cfg.max_seq_len
    t0 = time.perf_counter()
    res = evaluate_lm(loaded.model, tokens, loaded.tokenizer, seq_len=seq_len,
                      batch_size=args.batch_size, max_tokens=args.max_tokens)  # fmt: skip
    res = {"source": loaded.source, "recipe": loaded.recipe, "data": what, **res,
           "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    bpb = res["bits_per_byte"]
    print(f"{loaded.source} under {loaded.recipe} on {what}: loss {res['loss']:.4f}, "
          f"perplexity {res['perplexity']:.2f}, bits/byte "
          f"{'-' if bpb is None else f'{bpb:.4f}'} ({res['tokens']:,} tokens)")  # fmt: skip
    out = args.out or loaded.home / "eval.json"
    previous = json.loads(out.read_text()) if out.is_file() else {"evaluations": []}
    previous["evaluations"].append(res)
    write_text_atomically(out, json.dumps(previous, indent=1) + "\n")
    print(f"results: {out}")
    return 0
