"""``mxfp8 generate RUN_OR_DIR --prompt TEXT``: continue a prompt with a trained model,
streaming the text to stdout as it is generated.

Greedy at ``--temperature 0`` (the default); otherwise sampling with optional ``--top-k`` and
``--top-p`` filtering, the same output for the same ``--seed``. A KV cache keeps each new
token to one position of compute (``--no-cache`` reruns the whole sequence instead; same
tokens). The model runs under its training recipe, or ``--recipe NAME``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a trained model (streams to stdout)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("path", type=Path, help="a run directory, a checkpoint directory, or a "
                   "model directory (mxfp8 export, or transformers' save_pretrained)")  # fmt: skip
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step of RUN")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default=None, help="run the model under this named recipe")
    p.add_argument("--no-cache", action="store_true", help="no KV cache (slower, same tokens)")
    return p


def run(args: argparse.Namespace) -> int:
    from mxfp8.data.tokenizer import eot_id
    from mxfp8.interop.generate import check_args, generate
    from mxfp8.interop.source import open_model

    check_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    loaded = open_model(args.path, step=args.step, recipe=args.recipe)
    tok = loaded.tokenizer
    prompt = tok.encode(args.prompt).ids
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    new: list[int] = []
    shown = ""
    for token in generate(loaded.model, prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, stop_id=eot_id(tok),
                          use_cache=not args.no_cache):  # fmt: skip
        new.append(token)
        text = tok.decode(new)
        if text.endswith("\ufffd"):  # a multi-byte character not complete yet: wait
            continue
        out.write(text[len(shown) :])
        out.flush()
        shown = text
    out.write(tok.decode(new)[len(shown) :] + "\n")
    return 0
