"""Step time of ``--memory lean`` against mxfp8, and of each of its savers alone, side by side.

One step = forward + backward under bf16 autocast, clipping and the optimizer step, on a fixed
batch, for the model of the memory benchmark (d_model 1024, 4 layers, ffn 2816, 16 x 256
tokens; ``benchmarks/memory.py``). The variants' steps are interleaved (mxfp8, lean, each
saver, mxfp8, ...) after untimed warm-up steps that compile the quantizers, so that load from
other processes hits all alike; the median of the timed steps is reported, with its ratio to
mxfp8's.

Target (issue 24): ``--memory lean`` at most 1.15x mxfp8's step time.

Usage: python benchmarks/lean_step.py [--threads 2] [--steps 3] [--warmup 2]
           [--variants mxfp8,lean,norm,swiglu,attention,attention-out,chunk,fp8-states,
                       bf16-grads]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import mxfp8
from mxfp8.config.sections import OptimConfig
from mxfp8.config.train_config import load_config
from mxfp8.layers.convert import convert_model
from mxfp8.layers.step import step_window
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer
from mxfp8.optim.bf16_grads import gradient_holders, step_optimizer
from mxfp8.optim.mx_grads import gradient_store
from mxfp8.train.optim import build_optimizer, clip_gradients

MODEL = {"d_model": 1024, "n_layers": 4, "ffn_hidden": 2816, "n_heads": 8, "n_kv_heads": 2}
PLAIN = {"compact": (), "loss_chunk": 0, "states": "fp32", "grad_dtype": "fp32"}


def variants() -> dict[str, dict[str, Any]]:
    lean = load_config(overrides={"run.memory": "lean"})
    return {
        "mxfp8": PLAIN,
        "lean": {"compact": lean.run.compact_activations, "loss_chunk": lean.run.loss_chunk,
                 "states": lean.optim.states, "grad_dtype": lean.optim.grad_dtype},
        "norm": {**PLAIN, "compact": ("norm",)},
        "swiglu": {**PLAIN, "compact": ("swiglu",)},
        "attention": {**PLAIN, "compact": ("attention",)},
        "attention-out": {**PLAIN, "compact": ("attention-out",)},
        "chunk": {**PLAIN, "loss_chunk": lean.run.loss_chunk},
        "fp8-states": {**PLAIN, "states": "fp8"},
        "bf16-grads": {**PLAIN, "grad_dtype": "bf16"},
        "mx-grads": {**PLAIN, "grad_dtype": "mx"},
        "lean-mx-grads": {"compact": lean.run.compact_activations, "loss_chunk":
                          lean.run.loss_chunk, "states": lean.optim.states, "grad_dtype": "mx"},
    }  # fmt: skip


def make_step(spec: dict[str, Any], batch: int, seq: int, vocab: int):
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=vocab, **MODEL))
    model = convert_model(model, mxfp8.recipe("mxfp8"), compile_quantize=True)
    model.set_loss_chunk(spec["loss_chunk"])
    model.set_compact_activations(spec["compact"], compiled=True)
    ocfg = OptimConfig(states=spec["states"], grad_dtype=spec["grad_dtype"])
    opt = build_optimizer(model, ocfg)
    held = gradient_store(model.named_parameters(), spec["grad_dtype"], hooks=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq), generator=g)
    y = torch.randint(0, vocab, (batch, seq), generator=g)

    def step() -> float:
        t = time.perf_counter()
        with step_window(model, micro_batches=1):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, y)
            loss.backward()
        named = gradient_holders(model.named_parameters(), held)
        clip_gradients(named, ocfg.grad_clip)
        step_optimizer(opt, held)
        if held is not None:
            held.clear()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(variants()))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = variants()
    names = args.variants.split(",")
    unknown = set(names) - set(specs)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(specs)}")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x seq "
          f"{args.seq}, vocab {args.vocab}, model {MODEL}")  # fmt: skip
    steps = {n: make_step(specs[n], args.batch, args.seq, args.vocab) for n in names}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.steps):
        for n, s in steps.items():
            times[n].append(s())
    base = statistics.median(times["mxfp8"]) if "mxfp8" in times else None
    print(f"{'variant':<12} {'median s':>9} {'x mxfp8':>8}   steps (s)")
    for n in names:
        med = statistics.median(times[n])
        ratio = f"{med / base:7.2f}x" if base else "      -"
        print(f"{n:<12} {med:9.2f} {ratio}   " + " ".join(f"{t:.2f}" for t in times[n]))


if __name__ == "__main__":
    main()
