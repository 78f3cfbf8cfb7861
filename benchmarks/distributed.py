"""Per-rank training state and step time of FSDP2 (or DDP) at world size 1 and 2, side by side
in one invocation (``make bench``).

The script launches itself with ``torchrun --standalone --nproc-per-node N`` for each world
size (gloo on CPU, NCCL on CUDA) and collects one JSON line from rank 0 of each job. Each job
builds the same model (seed 0), converts it to the recipe, wraps it (``--mode``), runs
``--warmup`` untimed steps (compilation, lazily created AdamW states) and ``--steps`` timed
ones through the training loop's own step (:func:`mxfp8.train.step.run_step`) on the same
global batch of ``--batch`` sequences, split over the ranks. Per rank it measures:

- the bytes of its parameters, gradients (after backward, before ``zero_grad``) and AdamW
  states: with FSDP2 each rank holds a shard of each (``DTensor.to_local()``); the largest rank
  is reported;
- the median step time (information only on a 2-core CPU, where 2 ranks share the cores).

Target (the distributed issue): FSDP2 state per rank at world size 2 at most **0.55x** that at
world size 1.

Usage: python benchmarks/distributed.py [--mode fsdp|ddp] [--recipe mxfp8] [--d-model 512
           --layers 4 --ffn 1408 --batch 8 --seq 128] [--warmup 2 --steps 3] [--json FILE]
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
from pathlib import Path
from typing import Any

import torch

TAG = "DISTRIBUTED-RESULT "
TARGET = 0.55
MIB = 2**20


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def child(args: argparse.Namespace) -> None:
    """One rank of one job: build, warm up, time, measure; rank 0 prints the result."""
    from mxfp8.config.train_config import load_config
    from mxfp8.train.session import build
    from mxfp8.train.step import run_step

    cache = Path(args.cache)
    over = {
        "data.source": "shakespeare", "data.vocab_size": 4096, "data.cache_dir": str(cache),
        "model.d_model": args.d_model, "model.n_layers": args.layers,
        "model.ffn_hidden": args.ffn, "model.n_heads": args.heads,
        "model.n_kv_heads": args.kv_heads, "recipe.name": args.recipe,
        "run.batch_size": args.batch, "run.seq_len": args.seq, "run.progress": False,
        "run.steps": args.warmup + args.steps, "parallel.mode": args.mode,
        "run.out": str(cache / "unused"),
    }  # fmt: skip
    cfg = load_config(None, over)
    s = build(cfg, cache / "unused", lambda text: None)
    forward = s.forward_model or s.model
    parts: dict[str, int] = {}
    grads_seen = []

    def keep_grads(opt, *_):  # after backward and clipping, before the update
        grads_seen.append(_local_bytes(p.grad for p in s.model.parameters()))

    handle = s.optimizer.register_step_pre_hook(keep_grads)
    times = []
    for step in range(1, args.warmup + args.steps + 1):
        t0 = time.perf_counter()
        run_step(s, step, forward)
        if step > args.warmup:
            times.append(time.perf_counter() - t0)
    handle.remove()
    params = {id(p): p for p in s.model.parameters()}.values()
    parts["parameters"] = _local_bytes(params)
    parts["gradients"] = max(grads_seen)
    parts["optimizer"] = _local_bytes(
        v for st in s.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    )
    parts["total"] = parts["parameters"] + parts["gradients"] + parts["optimizer"]
    # the largest rank's figures, and rank 0's step times
    figures = torch.tensor([parts[k] for k in ("parameters", "gradients", "optimizer", "total")],
                           dtype=torch.float64)  # fmt: skip
    s.comm.max_(figures)
    if s.comm.is_main:
        keys = ("parameters", "gradients", "optimizer", "total")
        out = {k: int(v) for k, v in zip(keys, figures.tolist(), strict=True)}
        out.update(world_size=s.comm.world_size, mode=s.mode.value,
                   step_s=statistics.median(times), times=times)  # fmt: skip
        print(TAG + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="fsdp", choices=("fsdp", "ddp"))
    ap.add_argument("--recipe", default="mxfp8")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worlds", default="1,2", help="world sizes to run, e.g. 1,2,4")
    ap.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device == "cuda" else "gloo"
    print(f"torch {torch.__version__}, {device} ({backend}), {os.cpu_count()} CPUs; mode "
          f"{args.mode}, recipe {args.recipe}; d_model {args.d_model}, {args.layers} layers, "
          f"ffn {args.ffn}; global batch {args.batch} x {args.seq} tokens")  # fmt: skip
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache:
        from mxfp8.data.prepare import DataConfig, prepare_data  # once, before the jobs

        prepare_data(DataConfig(source="shakespeare", vocab_size=4096, cache_dir=cache))
        keys = ("mode", "recipe", "d_model", "layers", "ffn", "heads", "kv_heads", "batch",
                "seq", "warmup", "steps")  # fmt: skip
        passthrough = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(vars(args)[k]))]
        for world in (int(w) for w in args.worlds.split(",")):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={world}", __file__, "--child", "--cache", cache,
                   *passthrough]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith(TAG)), None)
            if res.returncode != 0 or line is None:
                print(f"world size {world}: failed (exit {res.returncode})\n{res.stderr[-3000:]}")
                continue
            results.append(json.loads(line[len(TAG) :]))
    if not results:
        return
    base = results[0]
    print(f"\n{'world':>5} {'params MiB':>11} {'grads MiB':>10} {'AdamW MiB':>10} "
          f"{'total MiB':>10} {'vs 1':>6} {'step s':>8}")  # fmt: skip
    for r in results:
        ratio = r["total"] / base["total"]
        print(f"{r['world_size']:>5} {r['parameters'] / MIB:>11.1f} {r['gradients'] / MIB:>10.1f} "
              f"{r['optimizer'] / MIB:>10.1f} {r['total'] / MIB:>10.1f} {ratio:>5.2f}x "
              f"{r['step_s']:>8.2f}")  # fmt: skip
    two = next((r for r in results if r["world_size"] == 2), None)
    if two is not None and base["world_size"] == 1:
        ratio = two["total"] / base["total"]
        times = f"step time 2 vs 1: {two['step_s'] / base['step_s']:.2f}x"
        if args.mode == "fsdp":
            verdict = "met" if ratio <= TARGET else "NOT met"
            print(f"\ntarget: fsdp state per rank at world size 2 <= {TARGET}x world size 1: "
                  f"{ratio:.3f}x ({verdict}); {times}")  # fmt: skip
        else:  # the target is FSDP2's: DDP replicates by design
            print(f"\nddp replicates the state: {ratio:.3f}x per rank; {times}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
