"""The prepared GPU check: one script, one summary table, one JSON file (the GPU issue).

Sections, each timed with warm-up first and the median of repeats, each reported even when
another fails:

1. ``tests``: the CUDA test subset (``pytest -m cuda``; on CPU every one of them skips);
2. ``quantize``: GB/s of input read by ``quantize`` (Inductor and Triton kernels; bf16 and
   fp32; 16384 x 16384) against ``copy_``'s, the memory ceiling;
3. ``linear``: MXLinear forward+backward against ``nn.Linear`` under bf16 autocast, at
   8192x4096x4096 and 16384x8192x8192 (tokens x in x out), with the layer's default quantize
   kernel on CUDA (Inductor) and with ``quantize_kernel="triton"``;
4. ``train_step``: one optimizer step of presets ``350m`` and ``1b``, mxfp8 against bf16
   (tokens/s, peak memory);
5. ``run``: a 150-step ``125m`` run under bf16 and under mxfp8 on the built-in corpus, and
   the gap of their final validation losses.

Targets on an H200 (printed next to the figures): quantize >= 70 % of copy bandwidth; the
MX linear at 8192x4096x4096 <= 1.3x bf16; the ``1b`` step <= 1.3x bf16 with peak memory <=
bf16's.

``--cpu-dry-run`` runs every section at tiny sizes on CPU (Triton through its interpreter),
so the script is known to work before it first meets a GPU; the test suite runs it.

Usage: bash benchmarks/gpu_check.sh [--cpu-dry-run] [--json FILE]
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
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

TARGETS = {"quantize_frac_of_copy": 0.70, "linear_ratio": 1.3, "step_ratio_1b": 1.3}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], object], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_tests(dry: bool, device: str) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider"]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    last = (res.stdout.strip().splitlines() or [""])[-1]
    # exit 5: nothing collected/selected; on CPU every CUDA test skips
    return {"exit": res.returncode, "summary": last, "ok": res.returncode in (0, 5)}


def check_quantize(dry: bool, device: str) -> dict[str, Any]:
    from mxfp8.numerics.backends import triton_available
    from mxfp8.numerics.quantize import quantize

    n = 64 if dry else 16384
    out: dict[str, Any] = {"n": n}
    kernels = ["inductor"] + (["triton"] if triton_available() else [])
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(n, n, device=device).to(dtype)
        buf = torch.empty_like(x)
        gb = x.numel() * x.element_size() / 1e9
        copy_s = _median_time(lambda x=x, buf=buf: buf.copy_(x), 2, 5)
        name = str(dtype).removeprefix("torch.")
        out[f"copy_{name}_gbs"] = gb / copy_s
        for k in kernels:
            s = _median_time(lambda x=x, k=k: quantize(x, "e4m3", kernel=k), 2, 3 if dry else 5)
            out[f"{k}_{name}_gbs"] = gb / s
            out[f"{k}_{name}_frac_of_copy"] = copy_s / s
    return out


def check_linear(dry: bool, device: str) -> dict[str, Any]:
    from mxfp8 import recipe
    from mxfp8.layers.linear import MXLinear
    from mxfp8.layers.step import step_window
    from mxfp8.numerics.backends import triton_available

    shapes = [(64, 64, 64)] if dry else [(8192, 4096, 4096), (16384, 8192, 8192)]
    out: dict[str, Any] = {}
    for m, k, n in shapes:
        ref = nn.Linear(k, n, bias=False, device=device)
        layers = {"bf16": ref}
        # the layer's default quantize kernel on CUDA (inductor) and the Triton one: which is
        # faster decides the documented default (docs/architecture.md, "Kernels")
        for name, kernel in (("mxfp8", None), ("mxfp8-triton", "triton")):
            if kernel == "triton" and not triton_available():
                continue
            mx = MXLinear(k, n, bias=False, device=device, recipe=recipe("mxfp8"),
                          compile_quantize=True, quantize_kernel=kernel)  # fmt: skip
            mx.weight = ref.weight
            layers[name] = mx
        x = torch.randn(m, k, device=device, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)

        def step(layer, x=x, dy=dy):
            def run():
                with (
                    step_window(layer, micro_batches=1),
                    torch.autocast(torch.device(device).type, dtype=torch.bfloat16),
                ):
                    layer(x).backward(dy)

            return run

        times = {name: _median_time(step(layer), 2, 3 if dry else 10)
                 for name, layer in layers.items()}  # fmt: skip
        ratios = {f"ratio_{name}": t / times["bf16"] for name, t in times.items() if name != "bf16"}
        out[f"{m}x{k}x{n}"] = {**times, "ratio": times["mxfp8"] / times["bf16"], **ratios}
    return out


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def check_train_step(dry: bool, device: str) -> dict[str, Any]:
    from mxfp8 import recipe
    from mxfp8.layers.convert import convert_model
    from mxfp8.layers.step import step_window
    from mxfp8.model.config import model_config
    from mxfp8.model.transformer import Transformer

    presets = {"tiny": dict(d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=128,
                            vocab_size=256)} if dry else {"350m": {}, "1b": {}}  # fmt: skip
    batch, seq = (2, 32) if dry else (8, 1024)
    out: dict[str, Any] = {}
    for preset, over in presets.items():
        row: dict[str, Any] = {}
        for rec in ("bf16", "mxfp8"):
            torch.manual_seed(0)
            model = Transformer(model_config(preset, **over)).to(device)
            if rec != "bf16":
                model = convert_model(model, recipe(rec), compile_quantize=True)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
            vocab = model.cfg.vocab_size
            x = torch.randint(0, vocab, (batch, seq), device=device)

            def step(model=model, opt=opt, x=x):
                with (
                    step_window(model, micro_batches=1),
                    torch.autocast(torch.device(device).type, dtype=torch.bfloat16),
                ):
                    _, loss = model(x, x)
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # compile, optimizer states
            _peak_reset()
            s = _median_time(step, 1, 2 if dry else 5)
            row[rec] = {"tokens_per_s": batch * seq / s, "step_s": s, "peak_mib": _peak_mib()}
            del model, opt
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row["ratio"] = row["mxfp8"]["step_s"] / row["bf16"]["step_s"]
        out[preset] = row
    return out


def check_run(dry: bool, device: str) -> dict[str, Any]:
    from mxfp8.config.train_config import load_config
    from mxfp8.train.loop import train

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = {"data.source": "shakespeare", "data.cache_dir": f"{tmp}/cache",
                "run.progress": False, "run.device": device}  # fmt: skip
        if dry:
            base.update({"model.n_layers": 1, "model.d_model": 64, "model.n_heads": 2,
                         "model.n_kv_heads": 1, "model.ffn_hidden": 128,
                         "data.vocab_size": 512, "run.steps": 3, "run.batch_size": 2,
                         "run.seq_len": 32, "run.eval_batches": 1})  # fmt: skip
        else:
            base.update({"model.preset": "125m", "run.steps": 150, "run.batch_size": 16,
                         "run.seq_len": 512, "run.eval_every": 50})  # fmt: skip
        for rec in ("bf16", "mxfp8"):
            cfg = load_config(None, {**base, "recipe.name": rec, "run.out": f"{tmp}/{rec}"})
            res = train(cfg)
            out[rec] = {"final_val_loss": res.final_val_loss, "tokens_per_s": res.tokens_per_s}
    out["gap_pct"] = 100 * (out["mxfp8"]["final_val_loss"] / out["bf16"]["final_val_loss"] - 1)
    return out


SECTIONS = {
    "tests": check_tests,
    "quantize": check_quantize,
    "linear": check_linear,
    "train_step": check_train_step,
    "run": check_run,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes, on CPU")
    ap.add_argument("--json", default="gpu_check.json", help="where to write the results")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    args = ap.parse_args()
    device = "cpu" if args.cpu_dry_run or not torch.cuda.is_available() else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"gpu_check: torch {torch.__version__}, device {name}, dry run {args.cpu_dry_run}")
    results: dict[str, Any] = {"device": name, "dry_run": args.cpu_dry_run, "targets": TARGETS}
    failed = []
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            results[section] = SECTIONS[section](args.cpu_dry_run, device)
        except Exception as e:  # noqa: BLE001 - reported, and the other sections still run
            results[section] = {"error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
            failed.append(section)
        results[section]["seconds"] = time.perf_counter() - t0
        status = "FAILED" if section in failed else "ok"
        print(f"{section:<11} {status:<7} {results[section]['seconds']:7.1f} s  "
              f"{json.dumps({k: v for k, v in results[section].items() if k != 'seconds'})[:240]}",
              flush=True)  # fmt: skip
    Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"gpu_check: results in {args.json}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed or not results.get("tests", {}).get("ok", True) else 0


if __name__ == "__main__":
    if "--cpu-dry-run" in sys.argv:  # the Triton kernels through the interpreter on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    raise SystemExit(main())
