"""What the first step of a compiled run costs, from a cold and from a warm Inductor cache.

``run.compile = block`` compiles the transformer block (one graph for all blocks of a shape)
in the first step, forward and backward. Inductor keeps what it compiled in its on-disk
caches (FX graph and AOTAutograd caches, under ``TORCHINDUCTOR_CACHE_DIR``), so a second run
of the same model should not compile from scratch. This script runs the same training steps
in two fresh processes that share one new, empty cache directory, and prints each process's
first-step and steady step time: the first process pays the compilation, the second should
pay only dynamo's tracing and the cache lookups.

Usage: python benchmarks/compile_cost.py [--recipes bf16,mxfp8] [--model tiny|wide]
           [--batch 4] [--seq 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(recipe_name: str, model_name: str, batch: int, seq: int) -> None:
    import torch

    from mxfp8.layers.convert import convert_model
    from mxfp8.layers.recipe import recipe
    from mxfp8.layers.step import step_window
    from mxfp8.model.compiled_blocks import GRAPHS, compile_blocks
    from mxfp8.model.config import model_config
    from mxfp8.model.transformer import Transformer

    sys.path.insert(0, os.path.dirname(__file__))
    from train_step import MODELS

    torch.manual_seed(0)
    cfg = model_config("tiny", **MODELS[model_name])
    model = Transformer(cfg)
    rec = recipe(recipe_name)
    if rec.quantized:
        model = convert_model(model, rec)
    compile_blocks(model, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        with step_window(model), torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(json.dumps({"first_s": times[0], "steady_s": statistics.median(times[2:]),
                      "graphs": GRAPHS["block"]}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="bf16,mxfp8")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.batch, args.seq)
        return
    print(
        f"model {args.model}, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
        "run.compile = block; two fresh processes sharing one new Inductor cache"
    )
    print(f"{'recipe':<8} {'run':<5} {'first step s':>13} {'steady step s':>14} {'graphs':>7}")
    for name in args.recipes.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
                   "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
            for run in ("cold", "warm"):
                cmd = [sys.executable, __file__, "--child", name, "--model", args.model,
                       "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode:
                    print(f"{name:<8} {run:<5} failed: {out.stderr[-400:]}")
                    break
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name:<8} {run:<5} {r['first_s']:13.1f} {r['steady_s']:14.3f} "
                      f"{r['graphs']:7d}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
