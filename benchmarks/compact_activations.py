"""What saving activations as MX costs the gradients (``run.compact_activations``).

For a trained run directory (default: a fresh tiny model when none is given) and real
training batches of its corpus, one training forward and backward under the run's recipe,
first with every activation saved whole (the reference), then with each saver alone
(``norm``, ``swiglu``, ``attention``) and all three. For each, the SQNR in dB against the
reference of:

- the gradient reaching each compacted op's module input (RMSNorm: its input; FeedForward and
  Attention: the block's normed input), the worst module and the median;
- every parameter's gradient, the worst parameter and the whole gradient vector.

For scale, the same figures for the run's recipe against bf16 (what the MX linear layers
already cost the gradients), and the time of the forward and backward (median of 3) of each.

Usage: python benchmarks/compact_activations.py [RUN_DIR] [--batches 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

import mxfp8
from mxfp8.data.batches import get_batch
from mxfp8.data.prepare import prepare_data
from mxfp8.interop.source import open_model
from mxfp8.layers.compact_activations import CompactSaved
from mxfp8.model.attention import Attention
from mxfp8.model.transformer import FeedForward, RMSNorm

VARIANTS = [("norm",), ("swiglu",), ("attention",), tuple(m.value for m in CompactSaved)]


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    noise = float((ref - got).square().sum())
    return float("inf") if noise == 0 else 10 * torch.log10(ref.square().sum() / noise).item()


def one_pass(model: nn.Module, batches, recipe) -> tuple[dict[str, torch.Tensor], dict, float]:
    """Gradients of the parameters and of each op module's input, summed over ``batches``."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, RMSNorm | FeedForward | Attention):

            def hook(mod, grad_in, grad_out, name=name):
                g = grad_in[0].detach().clone()
                inputs[name] = inputs[name] + g if name in inputs else g

            handles.append(m.register_full_backward_hook(hook))
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for x, y in batches:
        with recipe.autocast("cpu"):
            _, loss = model(x, y)
        loss.backward()
    seconds = time.perf_counter() - t0
    for h in handles:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return grads, inputs, seconds


def compare(ref, got) -> dict[str, Any]:
    (gp, gi, _), (rp, ri, _) = got, ref
    per_param = {n: sqnr(rp[n], gp[n]) for n in rp}
    per_input = {n: sqnr(ri[n], gi[n]) for n in ri}
    whole = sqnr(torch.cat([rp[n].flatten() for n in rp]), torch.cat([gp[n].flatten() for n in rp]))
    worst_p = min(per_param, key=per_param.get)
    worst_i = min(per_input, key=per_input.get)
    return {"whole": whole, "worst_param": (worst_p, per_param[worst_p]),
            "worst_input": (worst_i, per_input[worst_i]),
            "median_input": statistics.median(per_input.values())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="a run directory (default: a fresh tiny model)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:
        loaded = open_model(args.run)
        model, recipe, cfg = loaded.model, loaded.run_recipe, loaded.run_config
        data = prepare_data(cfg.data)
        run = cfg.run
        batches = [get_batch(data, "train", seed=run.seed, step=s, micro=0,
                             batch_size=run.batch_size, seq_len=run.seq_len)
                   for s in range(args.batches)]  # fmt: skip
        what = f"{args.run} ({loaded.source}), recipe {loaded.recipe}"
    else:
        from mxfp8.layers.convert import convert_model
        from mxfp8.model.config import model_config
        from mxfp8.model.transformer import Transformer

        torch.manual_seed(0)
        model = Transformer(model_config("tiny", vocab_size=4096))
        recipe = mxfp8.recipe("mxfp8")
        model = convert_model(model, recipe)
        g = torch.Generator().manual_seed(0)
        batches = [
            (torch.randint(0, 4096, (8, 128), generator=g),) * 2 for _ in range(args.batches)
        ]
        what = "a fresh tiny model (random tokens), recipe mxfp8"
    model.train()
    print(f"{what}; {args.batches} batches; {torch.get_num_threads()} threads")
    ref = one_pass(model, batches, recipe)
    # for scale: the same weights with plain linears under bf16 autocast, against the recipe
    from mxfp8.model.transformer import Transformer

    plain = Transformer(model.cfg)
    plain.load_state_dict(model.state_dict())
    plain.train()
    hp = one_pass(plain, batches, mxfp8.recipe("bf16"))
    rows = [("(none; bf16 vs the recipe)", compare(hp, ref), ref[2], hp[2])]
    for variant in VARIANTS:
        m = copy.deepcopy(model).set_compact_activations(variant)
        got = one_pass(m, batches, recipe)
        times = [got[2]] + [one_pass(m, batches, recipe)[2] for _ in range(2)]
        base = [ref[2]] + [one_pass(model, batches, recipe)[2] for _ in range(2)]
        rows.append(("+".join(variant), compare(ref, got), statistics.median(times),
                     statistics.median(base)))  # fmt: skip
    print(f"{'saved as MX':<24} {'all grads':>9} {'worst param':>28} {'worst input':>30} "
          f"{'median input':>12} {'fwd+bwd s':>9} {'x whole':>7}")  # fmt: skip
    for name, c, t, tb in rows:
        wp, wi = c["worst_param"], c["worst_input"]
        print(f"{name:<24} {c['whole']:>6.1f} dB {wp[0]:>20} {wp[1]:5.1f} dB "
              f"{wi[0]:>22} {wi[1]:5.1f} dB {c['median_input']:>9.1f} dB {t:>9.2f} "
              f"{t / tb:>6.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
