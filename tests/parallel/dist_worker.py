"""Scenarios run under torchrun by the distributed tests (gloo, CPU): each rank writes what it
saw to OUT/rankR.json (or .pt), and the test compares. Also imported by the tests for the
single-process side of a comparison.

    torchrun --standalone --nproc-per-node 2 tests/parallel/dist_worker.py SCENARIO OUT [ARGS]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import mxfp8
from mxfp8.config.train_config import load_config
from mxfp8.layers import mx_function
from mxfp8.layers.convert import convert_model, scaling_state_dict
from mxfp8.layers.step import step_window
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer
from mxfp8.parallel import DistEnv, init_process_group
from mxfp8.parallel.wrap import shard_model
from mxfp8.train.hooks import TrainHook
from mxfp8.train.loop import train

# 96 = 3 MX blocks, sharded 48 + 48 over 2 ranks: the dgrad copy's blocks (along dim 0, the
# dim FSDP2 shards) straddle the shard boundary, so quantizing shards locally would show
TINY = dict(d_model=96, n_layers=2, n_heads=3, n_kv_heads=1, ffn_hidden=160, vocab_size=256)


def tiny_config(out: Path, cache: str, **overrides):
    """A 2-layer model on the tests' Shakespeare cache, a few steps, every step logged."""
    base = {
        "data.source": "shakespeare", "data.vocab_size": 512, "data.cache_dir": cache,
        "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2, "model.n_kv_heads": 1,
        "model.ffn_hidden": 128, "run.steps": 4, "run.batch_size": 4, "run.seq_len": 32,
        "run.log_every": 1, "run.eval_batches": 1, "run.progress": False,
        "run.compile_quantize": False, "run.out": str(out), "run.seed": 1,
    }  # fmt: skip
    return load_config(None, {**base, **overrides})


# --- the quantized weight copies ------------------------------------------------------------


def record_weight_operands(model) -> dict[str, torch.Tensor]:
    """One training forward + backward of ``model`` (tokens fixed by the seed) inside a step
    window, recording the weight operand each MX GEMM consumed: ``{"LAYER/fprop": ...,
    "LAYER/dgrad": ...}`` (the dequantized FP8 x E8M0 operands, bit for bit what the GEMM
    used), through the layers' default path (no observer)."""
    seen: dict[str, torch.Tensor] = {}
    cached: dict[str, int] = {}  # the most each layer's weight cache held during the window
    original = mx_function.weight_operand

    def spy(layer, weight, plan, gemm, **kw):
        out = original(layer, weight, plan, gemm, **kw)
        if layer is not None:
            seen[f"{layer.name}/{gemm}"] = out[0].detach().clone().cpu()
            cached[layer.name] = max(cached.get(layer.name, 0), layer.weight_cache_nbytes())
        return out

    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, TINY["vocab_size"], (2, 32), generator=gen)
    mx_function.weight_operand = spy
    try:
        with step_window(model), torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
            loss.backward()
    finally:
        mx_function.weight_operand = original
    return {**seen, "cache_bytes": torch.tensor(sum(cached.values()))}


def build_model(compiled: bool) -> torch.nn.Module:
    """The model every rank builds (seed 0), converted to mxfp8."""
    torch.manual_seed(0)
    return convert_model(Transformer(model_config("tiny", **TINY)), mxfp8.recipe("mxfp8"),
                         compile_quantize=compiled)  # fmt: skip


def reference_model(param_dtype: str, compiled: bool) -> torch.nn.Module:
    """:func:`build_model` in one process; with ``bf16`` its parameters are cast to bf16, as
    FSDP2's bf16 gather hands them to the layers."""
    model = build_model(compiled)
    if param_dtype == "bf16":
        model = model.to(torch.bfloat16)
    return model


def copies(out: Path, param_dtype: str, compiled: str) -> None:
    env = DistEnv.from_environ()
    init_process_group(env, "gloo", torch.device("cpu"), 60)
    model = build_model(compiled == "compiled")
    shard_model(model, list(model.layers), param_dtype=param_dtype, reshard_after_forward=True)
    shard_rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    seen = record_weight_operands(model)
    torch.save({"operands": seen, "shard_rows": shard_rows}, out / f"rank{env.rank}.pt")


# --- hooks that break one rank ----------------------------------------------------------------


class InfOnOneRank(TrainHook):
    """At step ``step``, rank ``rank`` multiplies its embedding output by Inf (once)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step, self.model = rank, step, None

    def on_train_start(self, ctx) -> None:
        self.model = ctx.model

    def on_step_start(self, step: int) -> None:
        if step != self.step or DistEnv.from_environ().rank != self.rank:
            return

        def poison(module, args, output):
            handle.remove()
            return output * float("inf")

        handle = self.model.tok_embeddings.register_forward_hook(poison)


class RaiseOnOneRank(TrainHook):
    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step_start(self, step: int) -> None:
        if step == self.step and DistEnv.from_environ().rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step}")


def _full_params_digest(model) -> float:
    """A number that differs when any full parameter differs (every rank gathers them)."""
    total = 0.0
    for i, (_, p) in enumerate(sorted(model.named_parameters())):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float((full.detach().double() * (i + 1)).sum())
    return total


class RecordRows:
    """Records the token rows this rank trains and evaluates on: every micro-batch the step
    draws (``mxfp8.train.step.micro_batch``, what the forward receives) and the session's
    validation batches. ``rows()``: ``{"train": [[step, micro, x], ...], "val": [x, ...]}``."""

    def __init__(self) -> None:
        from mxfp8.train import session, step

        self.step_mod, self.session_mod = step, session
        self.original = (step.micro_batch, session.build)
        self.train: list = []
        self.val: list = []

    def __enter__(self) -> RecordRows:
        micro_batch, build = self.original

        def record_micro_batch(s, step, micro):
            x, y = micro_batch(s, step, micro)
            self.train.append([step, micro, x.tolist()])
            return x, y

        def record_build(*args, **kw):
            s = build(*args, **kw)
            self.val = [x.tolist() for x, _ in s.val_batches]
            return s

        self.step_mod.micro_batch = record_micro_batch
        self.session_mod.build = record_build
        return self

    def __exit__(self, *exc) -> None:
        self.step_mod.micro_batch, self.session_mod.build = self.original

    def rows(self) -> dict:
        return {"train": self.train, "val": self.val}


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter in full (gathered from the shards under FSDP2), fp32, on CPU."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().float().cpu().clone()
    return out


def train_and_report(out: Path, cache: str, hooks=(), **overrides) -> None:
    """Train the tiny config (``overrides`` as ``section.field=value`` pairs) and write what
    this rank ended with: rankR.json (losses, skips, the rows it saw...) and rankR.pt (the
    full parameters before the first step and after the last)."""
    cfg = tiny_config(out / "run", cache, **overrides)
    seen: dict = {}

    class Keep(TrainHook):
        def on_train_start(self, ctx) -> None:
            seen["model"] = ctx.model
            seen["start"] = full_params(ctx.model)  # the weights before the first step

        def on_step_end(self, step, metrics) -> None:
            seen.setdefault("skips", []).append(bool(metrics.get("nonfinite")))
            seen.setdefault("losses", []).append(metrics["loss"])
            seen.setdefault("grad_norms", []).append(metrics["grad_norm"])

    with RecordRows() as rows:
        result = train(cfg, hooks=[*hooks, Keep()])
    model = seen["model"]
    scaling = scaling_state_dict(model)
    rank = DistEnv.from_environ().rank
    report = {
        "rank": rank,
        "skipped_steps": result.skipped_steps,
        "skips": seen["skips"],
        "losses": seen["losses"],
        "grad_norms": seen["grad_norms"],
        "digest": _full_params_digest(model),
        "scaling": _plain(scaling),
        "rows": rows.rows(),
    }
    torch.save({"start": seen["start"], "end": full_params(model)}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _plain(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def main(argv: list[str]) -> None:
    scenario, out, *rest = argv
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if scenario == "copies":
        copies(out, *rest)
        return
    cache, *pairs = rest
    overrides = dict(p.split("=", 1) for p in pairs)
    hooks = {
        "train": (),
        "inf": (InfOnOneRank(rank=1, step=2),),
        "raise": (RaiseOnOneRank(rank=1, step=2),),
    }[scenario]
    train_and_report(out, cache, hooks, **overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
