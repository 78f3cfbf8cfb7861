"""Memory of one training step, bf16 against the MX recipes, with and without activation
checkpointing, side by side in one run (``make bench``).

One step is what the training loop does (:func:`mxfp8.train.step.run_step`, one micro-batch):
inside a step window, forward under bf16 autocast and backward; then gradient clipping,
AdamW on the fp32 master weights and ``zero_grad(set_to_none=True)``. Per configuration:

- live tensor bytes at the step's peak, in total and by kind (parameters, gradients,
  activations, backward temporaries, optimizer states), counted exactly by torch's
  ``MemTracker`` over a further step (``memory_probe.live_peak``): the figure
  ``max_memory_allocated`` gives on a GPU, free of the runtime and allocator slack that a
  CPU's RSS carries;
- peak memory of the step: on CPU the process's peak RSS over the step (VmHWM, reset just
  before it through ``/proc/self/clear_refs``), on CUDA ``max_memory_allocated``;
- bytes saved for backward (``saved_tensors_hooks`` around the forward), for the whole step and
  for the linear layers alone (saved while inside an ``nn.Linear``/``MXLinear`` forward); each
  storage counts once and parameters do not count (a bf16 cast of a weight does). With
  activation checkpointing this is what the first forward keeps, the block inputs; the peak
  covers the recompute in backward;
- resident memory after the step (RSS, or ``memory_allocated`` on CUDA);
- how the memory divides: fp32 weights, gradients, AdamW states, saved activations, the MX
  weight-operand caches and per-layer scratch buffers.

Why one fresh process per configuration: a CPU process's RSS and peak never forget what an
earlier configuration allocated (freed pages stay with the allocator, compiled kernels stay
loaded), so figures measured one after another in one process would not be comparable. The
script re-runs itself with ``--child SPEC`` for each configuration, one after another, and
collects one JSON line from each. One warm-up step comes first in every child, so the
quantizer compilation and the lazily created optimizer states are not the step's peak.

Targets (the memory issue), printed as a reminder: mxfp8 peak <= 0.85x bf16; linear-layer saved
bytes <= 0.6x bf16; mxfp8 with block checkpointing peak <= 0.75x bf16 without checkpointing.

Usage: python benchmarks/memory.py [--configs bf16,mxfp8,mxfp8+ac,mxfp8+chunk] [--threads N]
           [--json FILE] [--d-model 1024 --layers 4 --ffn 2816 --batch 16 --seq 256]
           [--vocab 4096] [--loss-chunk 1024] [--eager-quantize]

A configuration is a recipe name with suffixes: ``+ac`` (block activation checkpointing),
``+chunk`` (the LM head and loss in chunks of ``--loss-chunk`` tokens: ``run.loss_chunk``),
``+compact`` (the RMSNorm inputs, SDPA's q/k/v and the SwiGLU inputs saved as MX:
``run.compact_activations``), ``+lean`` (every field ``run.memory = lean`` sets: its compact
activations, loss chunk, optimizer states and gradient dtype), ``+mxgrads`` (gradients held
as MX: ``optim.grad_dtype = mx``, applied after ``+lean``), ``+mmap`` (glibc's mmap threshold
fixed at 256 KiB in that child: ``run.mmap_threshold_kib = 256``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

import mxfp8
from memory_probe import (
    MemoryProbe,
    SavedTensors,
    live_peak,
    nbytes,
    scratch_bytes,
)
from memory_tables import AC_SUFFIX, print_tables, print_targets
from mxfp8.config.sections import OptimConfig
from mxfp8.config.train_config import load_config
from mxfp8.layers.compact_activations import CompactSaved
from mxfp8.layers.convert import convert_model
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.step import step_window
from mxfp8.model.config import model_config
from mxfp8.model.transformer import Transformer
from mxfp8.optim.bf16_grads import gradient_holders, step_optimizer
from mxfp8.optim.mx_grads import MXHeldGrad, gradient_store
from mxfp8.train.heap import set_mmap_threshold
from mxfp8.train.optim import build_optimizer, clip_gradients

RESULT_TAG = "MEMORY-RESULT "  # the child's JSON line; anything else it prints is ignored
# shape of the d_model-1024 model of benchmarks/train_step.py ("wide"), 4 layers: ~49 M params
SUFFIXES = {"ac": "block activation checkpointing", "chunk": "run.loss_chunk",
            "compact": "run.compact_activations = all", "lean": "run.memory = lean",
            "mxgrads": "optim.grad_dtype = mx", "mmap": "run.mmap_threshold_kib = 256"}  # fmt: skip
DEFAULTS = {"d_model": 1024, "layers": 4, "ffn": 2816, "heads": 8, "kv_heads": 2}


# --- memory probes --------------------------------------------------------------------------


def enable_checkpointing(model: nn.Module, mode: str) -> list[nn.Module]:
    """Turn on the model's activation checkpointing; returns the checkpointed units (whose
    inputs are what the first forward keeps of them)."""
    model.set_activation_checkpointing(mode)
    return list(model.layers)


# --- one configuration (the child process) --------------------------------------------------


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the configuration, run a warm-up step, then measure one step."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec.get("mmap_kib"):  # run.mmap_threshold_kib, as the trainer sets it at start-up
        why_not = set_mmap_threshold(spec["mmap_kib"])
        if why_not:
            print(why_not, file=sys.stderr)
    probe = MemoryProbe(device)
    torch.zeros(1, device=device).add_(1)  # the runtime is up: the baseline includes it
    baseline = probe.current()

    torch.manual_seed(spec["seed"])
    model = Transformer(model_config("tiny", **spec["model"])).to(device)
    rec = mxfp8.recipe(spec["recipe"])
    if rec.quantized:
        model = convert_model(model, rec, compile_quantize=spec["compile_quantize"])
    model.set_loss_chunk(spec["loss_chunk"])
    model.set_compact_activations(spec["compact"], compiled=spec["compile_quantize"])
    saved = SavedTensors(model)
    if spec["ac"] != "none":
        saved.watch_inputs(enable_checkpointing(model, spec["ac"]))
    ocfg = OptimConfig(states=spec["states"], grad_dtype=spec["grad_dtype"])
    opt = build_optimizer(model, ocfg)
    # optim.grad_dtype = bf16 / mx: each gradient taken into the store as autograd finishes it
    held = gradient_store(model.named_parameters(), spec["grad_dtype"], hooks=True)
    gen = torch.Generator().manual_seed(spec["seed"])
    vocab, shape = model.cfg.vocab_size, (spec["batch"], spec["seq"])
    x = torch.randint(0, vocab, shape, generator=gen).to(device)
    y = torch.randint(0, vocab, shape, generator=gen).to(device)
    params = {id(p): p for p in model.parameters()}.values()
    param_ptrs = saved.params
    mx_layers = [m for m in model.modules() if isinstance(m, MXLinear)]
    parts: dict[str, int] = {}

    def step() -> None:
        with step_window(model, micro_batches=1):  # as the loop opens it
            with saved.forward(), torch.autocast(device.type, dtype=torch.bfloat16):
                _, loss = model(x, y)
            parts["caches"] = nbytes([m._weight_cache for m in mx_layers], param_ptrs)
            loss.backward()
            del loss
        parts["scratch"] = scratch_bytes(mx_layers)
        named = gradient_holders(model.named_parameters(), held)
        grads = [p.grad for _, p in named]  # tensors, or MX-held gradients (their own bytes)
        parts["gradients"] = nbytes([g for g in grads if not isinstance(g, MXHeldGrad)]) + sum(
            g.nbytes() for g in grads if isinstance(g, MXHeldGrad)
        )
        clip_gradients(named, ocfg.grad_clip, ocfg.module_thresholds())
        step_optimizer(opt, held)
        if held is not None:
            held.clear()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: compiles the quantizers, creates the AdamW states
    gc.collect()
    before = probe.current()
    probe.reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = probe.peak()
    after = probe.current()
    # a third step, under torch's MemTracker, whose dispatch mode torch.compile refuses: the
    # tracked step quantizes eagerly (the same bits; the eager kernel's temporaries are
    # larger than the compiled one's, so this live peak bounds the compiled run's from above)
    for m in mx_layers:
        m.compile_quantize = False
    model.set_compact_activations(spec["compact"], compiled=False)
    if hasattr(opt, "kernel"):  # 8-bit states: their quantizer eager too (the same bits)
        opt.kernel = {"compiled": False, "kernel": None}
    if hasattr(held, "kernel"):  # MX gradients: likewise
        held.kernel = {"compiled": False, "kernel": None}
    try:
        live = live_peak(step, model, opt)
    except Exception as e:  # noqa: BLE001 - reported, the other figures stand
        live = {"total": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    weights, adamw = nbytes(list(params)), nbytes(list(opt.state.values()))
    # what the process holds at the step's start beyond the weights, the AdamW states and the
    # scratch buffers (gradients are None, caches empty): on CPU the torch runtime, compiled
    # kernels and free memory the allocator kept; on CUDA about nothing
    runtime = before - weights - adamw - parts["scratch"] if before is not None else None
    return {
        "name": spec["name"],
        "recipe": spec["recipe"],
        "ac": spec["ac"],
        "peak": peak,
        "net_peak": peak - runtime if runtime is not None else None,
        "peak_method": probe.method,
        "live_peak": live["total"],
        "live": live,
        **saved.totals(),
        "resident_after": after,
        "resident_before": before,
        "step_s": seconds,
        "breakdown": {
            "weights": weights,
            "gradients": parts["gradients"],
            "adamw_states": adamw,
            "saved_activations": saved.totals()["saved"],
            "caches": parts["caches"],
            "scratch": parts["scratch"],
            "runtime": runtime,
        },
        "baseline": baseline,
    }


def child_main(spec_json: str) -> None:
    print(RESULT_TAG + json.dumps(measure(json.loads(spec_json))), flush=True)


# --- the parent: run the children, print the tables ----------------------------------------


def mx_recipes() -> list[str]:
    return [n for n in mxfp8.list_recipes() if mxfp8.recipe(n).scaling.value == "mx"]


def run_child(spec: dict[str, Any]) -> dict[str, Any] | str:
    """The child's result, or a line saying why there is none."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"failed (exit {proc.returncode}): {tail[:160]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    ap.add_argument(
        "--configs",
        default="",
        help="comma-separated configs, each a recipe name with an optional '+ac' (block "
        "activation checkpointing), e.g. bf16,mxfp8,mxfp8+ac; default: bf16 and every MX "
        "recipe, each with and without checkpointing",
    )
    ap.add_argument("--d-model", type=int, default=DEFAULTS["d_model"])
    ap.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    ap.add_argument("--ffn", type=int, default=DEFAULTS["ffn"], help="SwiGLU hidden width")
    ap.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    ap.add_argument("--kv-heads", type=int, default=DEFAULTS["kv_heads"])
    ap.add_argument("--vocab", type=int, default=model_config("tiny").vocab_size)
    ap.add_argument("--loss-chunk", type=int, default=None, help="tokens per chunk of the LM "
                    "head and loss in the '+chunk' configurations (run.loss_chunk; default "
                    "1024) and the '+lean' ones (default: the profile's)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument(
        "--eager-quantize",
        action="store_true",
        help="MX quantizers eager (default: compiled, as `mxfp8 train` does)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write every result to FILE")
    args = ap.parse_args()
    if args.child is not None:
        child_main(args.child)
        return

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = {
        "d_model": args.d_model,
        "n_layers": args.layers,
        "ffn_hidden": args.ffn,
        "n_heads": args.heads,
        "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab,
    }
    if args.seq > model_config("tiny").max_seq_len:
        overrides["max_seq_len"] = args.seq
    with torch.device("meta"):  # the count without allocating the model
        n_params = Transformer(model_config("tiny", **overrides)).num_params()
    names = args.configs.split(",") if args.configs else [
        n + ac for n in ("bf16", *mx_recipes()) for ac in ("", AC_SUFFIX)
    ]  # fmt: skip
    has_ac = hasattr(Transformer, "set_activation_checkpointing")

    print(f"torch {torch.__version__}, {args.threads} threads per child, device {device}")
    print(f"model: d_model {args.d_model}, {args.layers} layers, ffn {args.ffn}, heads "
          f"{args.heads}/{args.kv_heads} kv, vocab {args.vocab}: "
          f"{n_params / 1e6:.1f} M parameters; batch {args.batch} x seq {args.seq}; bf16 "
          f"autocast, eager model, MX quantizers "
          f"{'eager' if args.eager_quantize else 'compiled'}")  # fmt: skip
    if not has_ac and any(n.endswith(AC_SUFFIX) for n in names):
        print("note: Transformer has no set_activation_checkpointing (not landed yet): the '+ac' "
              "configurations are skipped")  # fmt: skip

    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for name in names:
        rec, *flags = name.split("+")
        unknown = set(flags) - set(SUFFIXES)
        if unknown:
            raise SystemExit(f"unknown suffix {sorted(unknown)} in --configs {name!r}; "
                             f"suffixes: {', '.join('+' + k for k in SUFFIXES)}")  # fmt: skip
        ac = "block" if "ac" in flags else "none"
        if rec not in mxfp8.list_recipes():
            known = ", ".join(mxfp8.list_recipes())
            raise SystemExit(f"unknown recipe {rec!r} in --configs; recipes: {known}")
        if ac != "none" and not has_ac:
            continue
        spec = {
            "name": name,
            "recipe": rec,
            "ac": ac,
            "model": overrides,
            "batch": args.batch,
            "seq": args.seq,
            "threads": args.threads,
            "device": device,
            "compile_quantize": not args.eager_quantize,
            "seed": args.seed,
            "loss_chunk": (args.loss_chunk or 1024) if "chunk" in flags else 0,
            "compact": list(CompactSaved) if "compact" in flags else [],
            "states": "fp32",
            "grad_dtype": "fp32",
        }
        if "lean" in flags:  # the profile's fields, as the config applies them
            lean = load_config(overrides={"run.memory": "lean"})
            spec.update(compact=list(lean.run.compact_activations), states=lean.optim.states,
                        grad_dtype=lean.optim.grad_dtype,
                        loss_chunk=args.loss_chunk or lean.run.loss_chunk)  # fmt: skip
        if "mxgrads" in flags:
            spec["grad_dtype"] = "mx"
        if "mmap" in flags:
            spec["mmap_kib"] = 256
        t0 = time.perf_counter()
        out = run_child(spec)
        took = time.perf_counter() - t0
        if isinstance(out, str):
            failures[name] = out
            print(f"  {name}: {out}", flush=True)
        else:
            results[name] = out
            print(f"  {name}: done in {took:.0f} s (step {out['step_s']:.2f} s)", flush=True)

    ref = results.get("bf16")
    if results:
        print_tables(results, ref)
        print_targets(results, ref)
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "device": device,
                "model": overrides, "params": n_params, "batch": args.batch, "seq": args.seq,
                "compile_quantize": not args.eager_quantize}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "failures": failures}, f, indent=1)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
