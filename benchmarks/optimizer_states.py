"""AdamW state storage side by side: fp32, bf16, ours (m in MX FP8, v in bf16), torchao's 8-bit
AdamWs.

For each variant, on the ``tiny`` model (vocab 512, Shakespeare):

- **state MiB**: bytes of every tensor the optimizer keeps (codes, scales, lookup tables,
  step counters), over the bytes of fp32 AdamW;
- **step ms**: ``optimizer.step()`` alone on fixed gradients, warmed up, the variants
  interleaved round by round (load from other processes hits all alike), the median;
- **loss**: the training loss (mean of the last 20 steps) and the validation loss after
  ``--steps`` steps of the real training step (``mxfp8.train.step.run_step``, same seed, same
  batches, same init), the optimizer swapped in;
- **resume**: 3 steps, the state dict through bytes (``torch.load(weights_only=True)``, what
  ``state.pt`` is read with) and through DCP into a fresh optimizer, then 3 more steps: are
  the weights bit-identical to 6 uninterrupted steps?
- **v storage**: the error of the fp32 run's second moment stored once in 8 bits, directly in
  E4M3 blocks against as sqrt(v) (the first version of :mod:`mxfp8.optim.fp8_states`): the
  share of non-zero v that rounds to 0, and the relative error of sqrt(v). One rounding does
  not show what decided against both, the stagnation of a v rounded every step
  (docs/architecture.md); v is now bf16;
- **gradient MiB** (optim.grad_dtype): over one backward in one process, the peak of the fp32
  ``p.grad`` tensors plus the bf16 store, and what is held at the end.

    python benchmarks/optimizer_states.py [--steps 300] [--rounds 15] [--seed 0]
        [--skip-train | --train-only]

torchao's optimizers keep ``lr`` as a tensor and raise on a float, so their runs here use a
schedule that writes the lr in place (:class:`TensorLrSchedule`); the training loop's
``Schedule`` writes floats.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mxfp8.config.train_config import load_config
from mxfp8.numerics.quantize import quantize
from mxfp8.optim.bf16_grads import BF16Grads
from mxfp8.optim.fp8_states import AdamWFP8States, blockable
from mxfp8.train.optim import AdamWBF16States, Schedule, param_groups
from mxfp8.train.session import build
from mxfp8.train.step import run_step

KW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def _torchao(name: str):
    from torchao.optim import AdamW8bit, AdamWFp8

    return {"AdamW8bit": AdamW8bit, "AdamWFp8": AdamWFp8}[name]


def make(variant: str, groups) -> torch.optim.Optimizer:
    if variant == "fp32":
        return torch.optim.AdamW(groups, **KW)
    if variant == "bf16":
        return AdamWBF16States(groups, **KW)
    if variant == "fp8 (ours)":
        return AdamWFP8States(groups, **KW)
    if variant == "fp8 (ours, eager q)":
        return AdamWFP8States(groups, **KW, compiled=False)
    return _torchao(variant.split()[1])(groups, **KW)


VARIANTS = ["fp32", "bf16", "fp8 (ours)", "fp8 (ours, eager q)", "torchao AdamW8bit",
            "torchao AdamWFp8"]  # fmt: skip


def tensors_of(value) -> list[torch.Tensor]:
    """The plain tensors a state value holds (a torchao state is a tensor subclass)."""
    if not isinstance(value, torch.Tensor):
        return []
    flatten = getattr(type(value), "__tensor_flatten__", None)
    if flatten is not None and type(value) is not torch.Tensor:
        names, _ = value.__tensor_flatten__()
        return [t for n in names for t in tensors_of(getattr(value, n))]
    return [value]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for v in s.values()
               for t in tensors_of(v))  # fmt: skip


def config(out: Path, cache: Path, steps: int, recipe: str, batch: int, seq: int, seed: int = 0):
    over = {"data.source": "shakespeare", "data.vocab_size": 512, "data.cache_dir": str(cache),
            "model.preset": "tiny", "recipe.name": recipe, "run.steps": steps,
            "run.batch_size": batch, "run.seq_len": seq, "run.out": str(out), "run.seed": seed,
            "run.progress": False, "run.eval_batches": 4}  # fmt: skip
    return load_config(None, over)


class TensorLrSchedule(Schedule):
    """The run's schedule; a group whose lr is a tensor (torchao's optimizers keep it so, to
    avoid recompiling their step, and raise on a float) gets it written in place."""

    def __init__(self, optimizer, cfg, total):
        super().__init__(optimizer, cfg, total)
        self.base_lrs = [float(lr) for lr in self.base_lrs]
        self.tensors = [g["lr"] for g in optimizer.param_groups]

    def set_step(self, step: int) -> float:
        lr = super().set_step(step)
        for g, t in zip(self.optimizer.param_groups, self.tensors, strict=True):
            if isinstance(t, torch.Tensor):
                g["lr"] = t.fill_(float(g["lr"]))
        return lr


def session(cfg, variant: str):
    s = build(cfg, cfg.run.out if isinstance(cfg.run.out, Path) else Path(cfg.run.out),
              lambda *_: None)  # fmt: skip
    s.optimizer = make(variant, param_groups(s.model, cfg.optim))
    s.schedule = TensorLrSchedule(s.optimizer, cfg.schedule, total=cfg.run.steps)
    return s


@torch.no_grad()
def val_loss(s) -> float:
    losses = []
    for x, y in s.val_batches:
        with s.recipe.autocast(s.device.type):
            _, loss = s.model(x, y)
        losses.append(float(loss))
    return sum(losses) / len(losses)


def train_losses(cfg, variants) -> tuple[dict, dict]:
    out, kept = {}, {}
    for v in variants:
        try:
            s = session(cfg, v)
            losses = [run_step(s, k, s.model)["loss"] for k in range(1, cfg.run.steps + 1)]
            out[v] = (sum(losses[-20:]) / len(losses[-20:]), val_loss(s))
            kept[v] = s.optimizer
        except Exception as e:  # noqa: BLE001 - reported in the table
            out[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return out, kept


def step_times(cfg, variants, rounds: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    s = session(cfg, "fp32")
    base = [p.detach().clone() for p in s.model.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in base]
    opts, params = {}, {}
    for v in variants:
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        try:
            opts[v], params[v] = make(v, [{"params": ps, "weight_decay": 0.1}]), ps
            for _ in range(3):
                opts[v].step()
        except Exception as e:  # noqa: BLE001
            opts.pop(v, None)
            print(f"{v}: step failed: {type(e).__name__}: {e}")
    times = {v: [] for v in opts}
    for _ in range(rounds):
        for v, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[v].append(time.perf_counter() - t)
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}, {
        v: state_bytes(o) for v, o in opts.items()
    }


def resume_check(variant: str) -> dict[str, str]:
    """6 steps straight vs 3 + save/load + 3, through torch.save bytes and through DCP."""
    torch.manual_seed(0)
    w0 = [torch.randn(256, 512), torch.randn(512)]
    grads = [[torch.randn_like(w) for w in w0] for _ in range(6)]

    def run(ks, ps, opt):
        for k in ks:
            for p, g in zip(ps, grads[k], strict=True):
                p.grad = g.clone()
            opt.step()

    def fresh_run():
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        return ps, make(variant, [{"params": ps, "weight_decay": 0.1}])

    want, opt = fresh_run()
    run(range(6), want, opt)
    res = {}
    for how in ("torch.save", "DCP"):
        try:
            ps, opt = fresh_run()
            run(range(3), ps, opt)
            ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
            fresh = make(variant, [{"params": ps2, "weight_decay": 0.1}])
            if how == "torch.save":
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                fresh.load_state_dict(torch.load(buf, weights_only=True))
            else:
                import torch.distributed.checkpoint as dcp

                with tempfile.TemporaryDirectory() as d:
                    dcp.save({"o": opt.state_dict()}, checkpoint_id=d)
                    for p in ps2:
                        p.grad = torch.zeros_like(p)
                    target = _fresh_target(fresh, ps2)
                    dcp.load(target, checkpoint_id=d)
                    fresh.load_state_dict(target["o"])
            run(range(3, 6), ps2, fresh)
            same = all(torch.equal(a, b) for a, b in zip(ps2, want, strict=True))
            res[how] = "bit-identical" if same else "DIFFERS"
        except Exception as e:  # noqa: BLE001
            res[how] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:70]}"
    return res


def _fresh_target(opt, ps) -> dict:
    """A state dict of the right structure to load into (a step of lr 0 creates the states)."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:  # torchao keeps lr as a tensor and refuses a float
        g["lr"] = torch.zeros(()) if isinstance(g["lr"], torch.Tensor) else 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = lr
    for p in ps:
        p.grad = None
    return {"o": opt.state_dict()}


def v_storage(opt: torch.optim.Optimizer) -> dict[str, tuple[float, float, float]]:
    """(share of non-zero v rounded to 0, median and p99 relative error of sqrt(v))."""
    vs = [s["exp_avg_sq"] for p, s in opt.state.items() if blockable(p)]
    v = torch.cat([x.reshape(-1, x.shape[-1]) for x in vs if x.shape[-1] == vs[0].shape[-1]])
    root = v.sqrt()
    out = {}
    for name, fn in {
        "v in E4M3": lambda: quantize(v).dequantize().sqrt(),
        "sqrt(v) in E4M3": lambda: quantize(root).dequantize(),
        "v in E5M2": lambda: quantize(v, "e5m2").dequantize().sqrt(),
    }.items():
        got = fn()
        nz = root > 0
        flushed = float(((got == 0) & nz).sum() / nz.sum())
        rel = ((got - root).abs() / root)[nz]
        q = torch.quantile(rel[torch.randperm(rel.numel())[:1_000_000]],
                           torch.tensor([0.5, 0.99]))  # fmt: skip
        out[name] = (flushed, float(q[0]), float(q[1]))
    return out


def gradient_bytes(cfg) -> dict[str, tuple[float, float]]:
    """Gradient bytes over one backward of the tiny model (fp32 master weights): the peak of
    the fp32 ``p.grad`` tensors plus the bf16 store, counted as each gradient is accumulated
    (before the store takes it), and what is held when backward ends; MiB."""
    out = {}
    for dtype in ("fp32", "bf16"):
        s = session(cfg, "fp32")
        params = [p for p in s.model.parameters() if p.requires_grad]
        stores: list[BF16Grads] = []
        peak = [0]

        def count(_p, params=params, stores=stores, peak=peak):
            live = sum(q.grad.nbytes for q in params if q.grad is not None)
            peak[0] = max(peak[0], live + sum(held_bytes(st) for st in stores))

        for p in params:  # registered first: runs before the store takes the gradient
            p.register_post_accumulate_grad_hook(count)
        if dtype == "bf16":
            stores.append(BF16Grads(s.model.named_parameters(), hooks=True))
        x, y = s.val_batches[0]
        with s.recipe.autocast(s.device.type):
            _, loss = s.model(x, y)
        loss.backward()
        end = sum(q.grad.nbytes for q in params if q.grad is not None)
        out[dtype] = (peak[0] / 2**20, (end + sum(held_bytes(st) for st in stores)) / 2**20)
    return out


def held_bytes(store: BF16Grads) -> int:
    return sum(h.nbytes for h in store.held.values())


def measure_steps(cfg, args) -> None:
    ms, nbytes = step_times(cfg, VARIANTS, args.rounds)
    n = sum(p.numel() for p in session(cfg, "fp32").model.parameters())
    print(f"threads {torch.get_num_threads()}; optimizer step on the tiny model's {n:,} "
          f"parameters, median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'variant':24} {'state MiB':>10} {'x fp32':>7} {'step ms':>8} {'x fp32':>7}")
    for v in (v for v in VARIANTS if v in ms):
        print(f"{v:24} {nbytes[v] / 2**20:10.2f} {nbytes[v] / nbytes['fp32']:7.3f} "
              f"{ms[v]:8.1f} {ms[v] / ms['fp32']:7.2f}")  # fmt: skip
    print("\nresume (6 steps straight vs 3 + state dict round trip + 3):")
    for v in VARIANTS:
        print(f"  {v:24} {resume_check(v)}")
    print("\ngradient MiB over one backward (peak while accumulating, held at its end):")
    for dtype, (peak, end) in gradient_bytes(cfg).items():
        print(f"  grad_dtype {dtype:5} {peak:8.2f} {end:8.2f}")


def measure_training(cfg, args) -> None:
    losses, kept = train_losses(cfg, [v for v in VARIANTS if "eager" not in v])
    print(f"\nafter {args.steps} steps (recipe {args.recipe}, batch {args.batch}x{args.seq}, "
          f"seed {args.seed}): train loss (mean of the last 20 steps), val loss")  # fmt: skip
    for v, r in losses.items():
        text = r if isinstance(r, str) else f"{r[0]:.4f}  {r[1]:.4f}"
        print(f"  {v:24} {text}")
    if "fp32" in kept:
        print("\nsecond moment of the fp32 run stored in 8 bits (blocks of 32, rceil): "
              "share of non-zero v -> 0, median / p99 relative error of sqrt(v)")  # fmt: skip
        for name, (fl, med, p99) in v_storage(kept["fp32"]).items():
            print(f"  {name:16} {fl:9.2e} {med:9.2e} {p99:9.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--recipe", default="bf16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="the training runs' seed")
    ap.add_argument("--cache", default=None, help="data cache folder (default: a temporary one)")
    ap.add_argument("--skip-train", action="store_true", help="no training runs")
    ap.add_argument("--train-only", action="store_true", help="only the training runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        cfg = config(Path(tmp) / "run", cache, args.steps, args.recipe, args.batch, args.seq,
                     args.seed)  # fmt: skip
        if not args.train_only:
            measure_steps(cfg, args)
        if not args.skip_train:
            measure_training(cfg, args)


if __name__ == "__main__":
    main()
