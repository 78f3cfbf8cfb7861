"""Forward+backward time of MXLinear (mxfp8 recipe) against the same layer in bf16 autocast.

Side by side in one run, same shapes, same inputs; prints the ratio MX / bf16. Shapes are
tokens x in_features x out_features. The MX layer runs the emulated backend (the CPU path:
fake-quantize, compiled, then bf16 matmuls with fp32 accumulation). Two MX columns:

- "cached W": the weight is quantized once per optimizer step and reused by every
  micro-batch (the steady state under gradient accumulation; here every iteration reuses it);
- "fresh W": the weight cache is off, so every iteration quantizes the weight (one
  micro-batch per step).

Usage: python benchmarks/linear.py [--reps N] [--shapes 4096x1024x4096 ...] [--no-large]
                                  [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe
from mxfp8.layers.step import step_window

SHAPES = ["4096x384x1536", "4096x1024x4096", "8192x2048x8192"]


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(dy)
    layer.weight.grad = None
    x.grad = None


def bench(shape: str, reps: int) -> tuple[float, float, float]:
    """Median seconds of (bf16, MX cached W, MX fresh W), measured interleaved.

    Interleaving (one iteration of each in turn) makes load from other processes on a shared
    machine hit all three alike, so the ratios stay meaningful when absolute times drift.
    """
    m, k, n = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False)
    cached = MXLinear.from_linear(lin, recipe("mxfp8"), compile_quantize=True)
    fresh = MXLinear.from_linear(lin, recipe("mxfp8"), compile_quantize=True)
    fresh.cache_weights = False
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)  # activations arrive bf16
    dy = torch.randn(m, n, dtype=torch.bfloat16)
    layers = (lin, cached, fresh)
    # the cached layer lives in one long step window: every iteration is another micro-batch
    # of the same optimizer step (the weight is quantized once, on the first one)
    with step_window(cached):
        for layer in layers:  # warm-up, and the first-call compile of the MX quantizer
            for _ in range(2):
                _fwd_bwd(layer, x, dy)
        times: list[list[float]] = [[], [], []]
        for _ in range(reps):
            for i, layer in enumerate(layers):
                t0 = time.perf_counter()
                _fwd_bwd(layer, x, dy)
                times[i].append(time.perf_counter() - t0)
    b, c, f = (statistics.median(t) for t in times)
    return b, c, f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shapes", nargs="*", default=SHAPES)
    p.add_argument("--no-large", action="store_true", help="skip 8192x2048x8192")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default). On a shared, oversubscribed machine 1 thread "
        "avoids timing the wait for a descheduled OpenMP thread at every parallel region",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for s in args.shapes if not (args.no_large and s == "8192x2048x8192")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}")
    head = f"{'tokens x in x out':>18} {'bf16 ms':>9} {'MX cached W':>12} {'ratio':>6}"
    print(head + f" {'MX fresh W':>11} {'ratio':>6}")
    for s in shapes:
        try:
            b, c, f = bench(s, args.reps)
        except RuntimeError as e:  # out of memory on a small machine
            print(f"{s:>18} skipped: {e}")
            continue
        print(
            f"{s:>18} {b * 1e3:9.1f} {c * 1e3:12.1f} {c / b:6.2f} {f * 1e3:11.1f} {f / b:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
