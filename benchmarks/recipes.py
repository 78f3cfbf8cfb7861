"""Every recipe side by side: SQNR of its three GEMM outputs, step time and saved bytes.

For ``docs/recipes.md``. Three measurements per recipe, all in one process and one run:

1. **SQNR** (dB) of the linear layer's forward output y, input gradient dx and weight
   gradient dW against an fp32 ``nn.Linear`` on the same x, W, dy (x, dy ~ N(0, 1), W ~
   N(0, 1/K); M = K = N = 512), under the recipe's autocast, on two data sets:
   ``gauss``, and ``outliers``: 8 rows (tokens) and 8 columns (channels) of x and of dy
   scaled by 2^10, where one scale per tensor, per row and per block differ; there the
   SQNR is over the ordinary elements (outputs outside the outlier rows and columns), the
   ones a shared scale starves.
   Deterministic: the same numbers on every machine up to the matmul's summation order.
2. **Step time** of one training step (forward + backward + AdamW, one micro-batch inside a
   step window, quantizers compiled as in training) of a small model, the recipes
   interleaved (every round runs each recipe once, in order, after two warm-up rounds
   that compile), median over the rounds, as a ratio to bf16's median.
3. **Saved bytes**: what the step's forward keeps for backward (``saved_tensors_hooks``,
   each storage once, parameters excluded), plus the MX weight cache (none in a step of one
   micro-batch), as a ratio to bf16's. Not the process peak: see benchmarks/memory.py.

Usage: python benchmarks/recipes.py [--recipes a,b,...] [--rounds 5] [--d-model 256]
           [--layers 2] [--batch 8] [--seq 128] [--threads 2] [--skip-steps]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from mxfp8.layers.convert import convert_model
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import list_recipes, recipe
from mxfp8.layers.step import step_window
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer

S = 512


def _data(kind: str):
    """(x, w, dy, masks of the ordinary elements of y, dx, dW)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(S, S, generator=g)
    w = torch.randn(S, S, generator=g) / S**0.5
    dy = torch.randn(S, S, generator=g)
    ones = torch.ones(S, S, dtype=torch.bool)
    if kind != "outliers":
        return x, w, dy, (ones, ones, ones)
    picks = []
    for t in (x, dy):
        rows, cols = torch.randperm(S, generator=g)[:8], torch.randperm(S, generator=g)[:8]
        t[rows] *= 1024
        t[:, cols] *= 1024
        picks.append((rows, cols))
    (xr, xc), (dr, dc) = picks
    my, mdx, mdw = ones.clone(), ones.clone(), ones.clone()
    my[xr] = False  # y [M, N]: x's outlier tokens
    mdx[dr] = False  # dx [M, K]: dy's outlier tokens
    mdw[dc] = False  # dW [N, K]: dy's outlier channels (rows), x's (columns)
    mdw[:, xc] = False
    return x, w, dy, (my, mdx, mdw)


def _grads(layer: nn.Module, x, dy, rec) -> tuple[torch.Tensor, ...]:
    xi = x.clone().requires_grad_(True)
    if rec is None:
        y = layer(xi)
    else:
        with rec.autocast("cpu"):
            y = layer(xi)
    y.backward(dy.to(y.dtype))
    return y.detach().float(), xi.grad, layer.weight.grad


def _sqnr(ref: torch.Tensor, got: torch.Tensor, mask: torch.Tensor) -> float:
    """SQNR over the masked elements; NaN when the result overflowed (fp16)."""
    ref, got = ref.double()[mask], got.double()[mask]
    if not torch.isfinite(got).all():
        return float("nan")
    noise = (ref - got).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def sqnr_table(names: list[str]) -> dict[tuple[str, str], tuple[float, float, float]]:
    out = {}
    for kind in ("gauss", "outliers"):
        x, w, dy, masks = _data(kind)
        lin = nn.Linear(S, S, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        ref = _grads(lin, x, dy, None)
        for name in names:
            rec = recipe(name)
            layer = MXLinear.from_linear(nn.Linear(S, S, bias=False), rec)
            layer.load_state_dict(lin.state_dict())
            got = _grads(layer, x, dy, rec)
            out[name, kind] = tuple(_sqnr(r, g, m) for r, g, m in zip(ref, got, masks,
                                                                       strict=True))  # fmt: skip
    return out


def make_step(name: str, args) -> tuple:
    torch.manual_seed(0)
    cfg = model_config("tiny", d_model=args.d_model, n_layers=args.layers,
                       n_heads=max(1, args.d_model // 64), n_kv_heads=1,
                       ffn_hidden=args.d_model * 8 // 3 // 32 * 32, vocab_size=2048)  # fmt: skip
    model = Transformer(cfg)
    rec = recipe(name)
    if rec.quantizes_any:
        model = convert_model(model, rec, compile_quantize=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    saved: dict[int, int] = {}

    def step(measure: bool = False) -> float:
        t = time.perf_counter()
        with step_window(model):
            if measure:
                params = {p.untyped_storage().data_ptr() for p in model.parameters()}

                def pack(v):
                    st = v.untyped_storage()
                    if st.data_ptr() not in params:
                        saved[st.data_ptr()] = st.nbytes()
                    return v

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
                    with rec.autocast("cpu"):
                        _, loss = model(x, y)
            else:
                with rec.autocast("cpu"):
                    _, loss = model(x, y)
            loss.backward()
            cache = sum(m.weight_cache_nbytes() for m in model.modules()
                        if isinstance(m, MXLinear))  # fmt: skip
        opt.step()
        opt.zero_grad(set_to_none=True)
        if measure:
            saved[-1] = cache
        return time.perf_counter() - t

    return step, saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=",".join(list_recipes()))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-steps", action="store_true", help="SQNR only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if "bf16" not in names:
        names = ["bf16", *names]
    table = sqnr_table(names)
    print(f"SQNR in dB against an fp32 nn.Linear, {S}x{S}x{S}, under each recipe's autocast "
          "(outliers: over the ordinary elements; nan: the output overflowed)")  # fmt: skip
    print(f"{'recipe':<18} {'gauss y':>8} {'dx':>6} {'dW':>6}   {'outliers y':>10} {'dx':>6} "
          f"{'dW':>6}")  # fmt: skip
    for n in names:
        g, o = table[n, "gauss"], table[n, "outliers"]
        cells = " ".join(f"{v:6.1f}" for v in g) + "   " + " ".join(f"{v:6.1f}" for v in o)
        print(f"{n:<18} {cells}")
    if args.skip_steps:
        return
    steps = {n: make_step(n, args) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds + 2):
        for n in names:
            dt = steps[n][0](measure=r == 1)
            if r >= 2:
                times[n].append(dt)
    base_t = statistics.median(times["bf16"])
    base_b = sum(steps["bf16"][1].values())
    print(f"\nstep of a d_model {args.d_model}, {args.layers}-layer model, {args.batch} x "
          f"{args.seq} tokens, {args.threads} threads; median of {args.rounds} interleaved "
          "rounds after 2 warm-up rounds")  # fmt: skip
    print(f"{'recipe':<18} {'step ms':>8} {'x bf16':>7} {'saved MiB':>10} {'x bf16':>7}")
    for n in names:
        t = statistics.median(times[n])
        b = sum(steps[n][1].values())
        print(f"{n:<18} {t * 1e3:8.1f} {t / base_t:7.2f} {b / 2**20:10.2f} {b / base_b:7.2f}")


if __name__ == "__main__":
    main()
