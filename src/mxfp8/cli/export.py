"""``mxfp8 export RUN [--step N] --out DIR [--format hf|mxfp8] [--dtype bf16|fp32]``: a
checkpoint as a Hugging Face ``LlamaForCausalLM`` directory.

``--format hf`` writes every weight in ``--dtype``; ``--format mxfp8`` stores each quantized
linear's weight as FP8 E4M3 with E8M0 block scales (``weight_scale_inv``, blocks of 32 along
the input dim), the rest in ``--dtype``. Both load with ``AutoModelForCausalLM`` and
``AutoTokenizer`` (offline), and with ``mxfp8.load_pretrained``; docs/interop.md has the
details.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face Llama directory (bf16/fp32 or MXFP8 weights)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("path", type=Path, help="a run directory (its newest intact checkpoint) or "
                   "a checkpoint directory")  # fmt: skip
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step of RUN")
    p.add_argument("--out", type=Path, required=True, help="the directory to write (new)")
    p.add_argument("--format", choices=("hf", "mxfp8"), default="hf")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="dtype of the weights not stored as MXFP8")  # fmt: skip
    p.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="split the weights into files of at most this size")  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    from mxfp8.checkpoint.find import find_checkpoint
    from mxfp8.errors import UserError
    from mxfp8.interop.export import export, read_source

    if not args.max_shard_gb > 0:
        raise UserError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    src = read_source(find_checkpoint(args.path, args.step))
    res = export(src, args.out, fmt=args.format, dtype=args.dtype,
                 max_shard_bytes=int(args.max_shard_gb * 2**30))  # fmt: skip
    mib = res["weight_bytes"] / 2**20
    print(f"exported step {res['step']} ({res['recipe']}) as {args.format} to {res['out']}: "
          f"{len(res['files'])} weight file(s), {mib:.1f} MiB")  # fmt: skip
    return 0
