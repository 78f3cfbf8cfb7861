"""Training-step time of bf16 and mxfp8, eager and compiled, side by side in one run
(``make bench``).

One step = forward + backward under bf16 autocast + AdamW on fp32 master weights, on a fixed
batch. Two models: ``tiny`` (the main job's) and ``wide`` (d_model 1024, 2 layers). The
variants (``--variants``; a variant is ``recipe:mode``, ``+ac`` for block checkpointing):

- ``eager``: no torch.compile at all;
- ``qcompiled``: only the MX quantizers compiled (the training default, run.compile = none);
- ``block``: each transformer block compiled in place (run.compile = block);
- ``model``: torch.compile of the whole model (run.compile = model).

Every variant is built, then warmed up until a step compiles nothing more (at least
``--warmup`` steps), then the variants' steps are interleaved (one step of each in turn,
``--steps`` rounds) so that load from other processes hits all alike. Reported: the median
step in ms, the spread (min-max), and the ratios the targets of issue 25 name.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._dynamo.utils import counters

from mxfp8.layers.convert import convert_model
from mxfp8.layers.recipe import recipe
from mxfp8.layers.step import step_window
from mxfp8.model.compiled_blocks import compile_blocks
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer

MODELS = {
    "tiny": {},
    "wide": {"d_model": 1024, "n_heads": 8, "n_kv_heads": 2, "ffn_hidden": 2816, "n_layers": 2},
}
DEFAULT_VARIANTS = "bf16:eager,bf16:block,mxfp8:qcompiled,mxfp8:block,mxfp8:block+ac"


def make_step(model_name: str, variant: str, batch: int, seq: int):
    recipe_name, mode = variant.split(":")
    mode, _, ac = mode.partition("+")
    torch.manual_seed(0)
    cfg = model_config("tiny", **MODELS[model_name])
    model = Transformer(cfg)
    rec = recipe(recipe_name)
    if rec.quantized:
        model = convert_model(model, rec, compile_quantize=mode != "eager")
    if ac:
        model.set_activation_checkpointing("block")
    if mode == "block":
        compile_blocks(model, torch.device("cpu"))
    fn = torch.compile(model) if mode == "model" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step() -> float:
        t = time.perf_counter()
        with step_window(model):  # one micro-batch per step, as the training loop does
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = fn(x, y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def warm(step, least: int) -> tuple[int, float]:
    """Run ``step`` until one compiles nothing (at least ``least`` times); returns (steps run,
    the first step's seconds: the compilation cost in this process)."""
    first, n = step(), 1
    while True:
        before = counters["stats"]["unique_graphs"]
        step()
        n += 1
        if n >= least and counters["stats"]["unique_graphs"] == before:
            return n, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,wide")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3, help="least untimed steps per variant")
    ap.add_argument("--steps", type=int, default=7, help="timed rounds")
    args = ap.parse_args()
    variants = args.variants.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x seq {args.seq} tokens per step")  # fmt: skip
    for model_name in args.models.split(","):
        steps, first = {}, {}
        for v in variants:
            try:
                steps[v] = make_step(model_name, v, args.batch, args.seq)
                n, first[v] = warm(steps[v], args.warmup)
            except Exception as e:  # a variant that fails is reported, not hidden
                steps.pop(v, None)
                print(f"{model_name} {v}: failed: {type(e).__name__}: {str(e)[:160]}")
        times: dict[str, list[float]] = {v: [] for v in steps}
        for _ in range(args.steps):
            for v, s in steps.items():
                times[v].append(s() * 1e3)
        med = {v: statistics.median(t) for v, t in times.items()}
        print(f"\n{model_name}: {'variant':<18} {'median ms':>10} {'min':>8} {'max':>8} "
              f"{'first step s':>13}")  # fmt: skip
        for v, t in times.items():
            print(f"{'':{len(model_name) + 2}}{v:<18} {med[v]:10.1f} {min(t):8.1f} {max(t):8.1f} "
                  f"{first[v]:13.1f}")  # fmt: skip
        if "mxfp8:block" in med and "bf16:block" in med:
            print(f"  mxfp8 compiled / bf16 compiled (block): "
                  f"{med['mxfp8:block'] / med['bf16:block']:.2f}x")  # fmt: skip
        bf = [m for v, m in med.items() if v.startswith("bf16:")]
        mx = [m for v, m in med.items() if v.startswith("mxfp8:")]
        if bf and mx:
            print(f"  best mxfp8 / best bf16: {min(mx) / min(bf):.2f}x")


if __name__ == "__main__":
    main()
