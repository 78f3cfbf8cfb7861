"""Cost of numerics telemetry: a training step with and without it, side by side.

A telemetry step measures every quantized operand of every MXLinear (6 per layer): it takes
the slower unfused quantize path (the MXTensor itself is needed), skips the weight cache, and
computes the statistics. The other steps are untouched. So the overhead of telemetry every N
steps is ``(t_telemetry - t_plain) / (N * t_plain)``; this script measures both step times,
interleaved so that machine load affects them alike, and prints that ratio for a few N.

    python benchmarks/telemetry.py [--recipe mxfp8] [--batch 16] [--seq 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mxfp8.layers.convert import convert_model
from mxfp8.layers.recipe import recipe
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer
from mxfp8.stats.telemetry import TelemetryCollector


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="mxfp8")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed steps of each kind")
    p.add_argument("--intervals", default="10,25,50,100")
    p.add_argument(
        "--compile-quantize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compiled MX fake-quantize on plain steps, as `mxfp8 train` does by default",
    )
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = model_config(args.model)
    model = convert_model(
        Transformer(cfg), recipe(args.recipe), compile_quantize=args.compile_quantize
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collector = TelemetryCollector(model)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    def step(observe: bool) -> float:
        t0 = time.perf_counter()
        if observe:
            collector.start(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if observe:
            collector.stop()
            collector.take()
        return time.perf_counter() - t0

    step(False)  # warm-up: allocator, first-call paths, compilation
    step(False)
    step(True)
    plain, observed = [], []
    for _ in range(args.repeats):
        plain.append(step(False))
        observed.append(step(True))
    t_plain, t_obs = statistics.median(plain), statistics.median(observed)
    n_layers = len(collector.layers)
    print(f"model {args.model}, recipe {args.recipe}, batch {args.batch}x{args.seq}, "
          f"{n_layers} quantized layers ({6 * n_layers} operands), "
          f"compile_quantize={args.compile_quantize}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"plain step      {t_plain * 1e3:9.1f} ms  (median of {args.repeats})")
    print(f"telemetry step  {t_obs * 1e3:9.1f} ms  ({t_obs / t_plain:.2f}x a plain step)")
    for n in (int(v) for v in args.intervals.split(",")):
        overhead = (t_obs - t_plain) / (n * t_plain) * 100
        print(f"telemetry every {n:4d} steps: overhead {overhead:5.2f} % of training time")


if __name__ == "__main__":
    main()
