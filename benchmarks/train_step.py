"""Training-step time, mxfp8 against bf16, side by side in one run (``make bench``).

One step = forward + backward under bf16 autocast + AdamW on fp32 master weights, on a fixed
batch. Two models: ``tiny`` (the main job's) and a wider one (d_model 1024, 2 layers). Each
is timed eager, with only the MX quantizers compiled (``qcompiled``, the training default),
and under ``torch.compile`` of the whole model; the two recipes' steps are interleaved (bf16, mxfp8,
bf16, ...) so that load from other processes hits both alike, and the median is reported.

Target (issue 4): on CPU, mxfp8 at most 1.15x the bf16 step time for the d_model-1024 model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mxfp8.layers.convert import convert_model
from mxfp8.layers.recipe import recipe
from mxfp8.layers.step import step_window
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer

MODES_HELP = (
    "eager: no torch.compile; qcompiled: only the MX quantizers compiled (what `mxfp8 train` "
    "does by default); compiled: torch.compile of the whole model as well"
)
MODELS = {
    "tiny": {},
    "wide": {"d_model": 1024, "n_heads": 8, "n_kv_heads": 2, "ffn_hidden": 2816, "n_layers": 2},
}


def make_step(model_name: str, recipe_name: str, mode: str, batch: int, seq: int):
    torch.manual_seed(0)
    cfg = model_config("tiny", **MODELS[model_name])
    model = Transformer(cfg)
    rec = recipe(recipe_name)
    if rec.quantized:
        model = convert_model(model, rec, compile_quantize=mode != "eager")
    fn = torch.compile(model) if mode == "compiled" else model
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,wide")
    ap.add_argument("--modes", default="eager,qcompiled,compiled", help=MODES_HELP)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per recipe")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x seq {args.seq} tokens per step")  # fmt: skip
    print(f"{'model':<6} {'mode':<9} {'bf16 ms':>9} {'mxfp8 ms':>9} {'ratio':>6}")
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            try:
                steps = {r: make_step(model_name, r, mode, args.batch, args.seq)
                         for r in ("bf16", "mxfp8")}  # fmt: skip
                for _ in range(args.warmup):
                    for s in steps.values():
                        s()
                times: dict[str, list[float]] = {r: [] for r in steps}
                for _ in range(args.steps):
                    for r, s in steps.items():
                        times[r].append(s())
            except Exception as e:  # a backend that fails here is reported, not hidden
                print(f"{model_name:<6} {mode:<9} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            bf16, mx = (statistics.median(times[r]) * 1e3 for r in ("bf16", "mxfp8"))
            print(f"{model_name:<6} {mode:<9} {bf16:9.1f} {mx:9.1f} {mx / bf16:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
