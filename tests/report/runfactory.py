"""Synthetic run directories that follow the run-directory contract (docs/architecture.md).

Reports are tested on these, so report tests need neither a model nor a training loop.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

LAYERS = ("blocks.0.attn.qkv", "blocks.0.mlp.up", "blocks.1.attn.qkv", "blocks.1.mlp.up")
OPERANDS = (
    ("fprop", "input"),
    ("fprop", "weight"),
    ("dgrad", "grad_output"),
    ("dgrad", "weight"),
    ("wgrad", "grad_output"),
    ("wgrad", "input"),
)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_run(
    root: Path,
    recipe: str,
    *,
    steps: int = 60,
    offset: float = 0.0,
    eval_every: int = 20,
    telemetry_every: int = 20,
    tensorwise: bool = False,
    spike_at: int | None = None,
    nan_from: int | None = None,
    seed: int = 0,
    dirname: str | None = None,
    final_val_loss: float | None = None,
) -> Path:
    """Write a run directory ``root/recipe`` (or ``root/dirname``) and return it.

    The loss decays like a real run, shifted by ``offset`` (a recipe's gap to bf16); bf16
    runs have no numerics, like a real bf16 run. ``final_val_loss`` sets summary.json's.
    """
    rng = random.Random(seed)
    run = root / (dirname or recipe)
    run.mkdir(parents=True)
    (run / "config.toml").write_text(
        f'[recipe]\nname = "{recipe}"\n\n[run]\nsteps = {steps}\nseed = {seed}\n'
        f"telemetry_every = {telemetry_every}\n",
        encoding="utf-8",
    )
    metrics = []
    for step in range(1, steps + 1):
        loss = 2.0 + 3.0 * math.exp(-step / 15) + offset + rng.uniform(-0.05, 0.05)
        if spike_at is not None and step == spike_at:
            loss += 4.0
        if nan_from is not None and step >= nan_from:
            loss = None  # what a NaN loss looks like after JSON (null)
        row = {
            "step": step,
            "loss": loss,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "loss_scale": 1.0,
            "skipped_steps": 0,
            "tokens": step * 4096,
            "tokens_per_s": 5000.0 + offset,
            "step_time_s": 0.8,
            "peak_mem_mb": 100.0,
        }
        if (step % eval_every == 0 or step == steps) and loss is not None:
            row["val_loss"] = loss + 0.1
            row["val_ppl"] = math.exp(loss + 0.1)
        metrics.append(row)
    _write_jsonl(run / "metrics.jsonl", metrics)
    numerics = []
    if recipe != "bf16" and telemetry_every:
        for step in range(telemetry_every, steps + 1, telemetry_every):
            for i, layer in enumerate(LAYERS):
                for gemm, operand in OPERANDS:
                    row = {
                        "step": step,
                        "layer": layer,
                        "gemm": gemm,
                        "operand": operand,
                        "fmt": "e4m3",
                        "saturated_pct": 0.01 * i * (step / steps),
                        "underflow_pct": 0.5 + 0.1 * i,
                        "sqnr_db": 31.0 - i * 0.5,
                        "amax": 2.0 + i,
                    }
                    if tensorwise:
                        row["scale"] = 448.0 / (2.0 + i + step / 100)
                        row["amax_history"] = [2.0 + i] * 4
                    else:
                        row["scale_exp_hist"] = {str(-8 - i): 10, str(-7 - i): 30 + step}
                    numerics.append(row)
    _write_jsonl(run / "numerics.jsonl", numerics)
    events = []
    if spike_at is not None:
        events.append(
            {
                "step": spike_at,
                "kind": "spike",
                "loss": 9.0,
                "baseline": 3.0,
                "layers": [
                    {
                        "layer": "blocks.1.mlp.up",
                        "gemm": "wgrad",
                        "operand": "grad_output",
                        "metric": "amax",
                        "change": 8.0,
                    }
                ],
            }
        )
    if nan_from is not None:
        events.append({"step": nan_from, "kind": "nan", "loss": None, "baseline": 2.5,
                       "layers": []})  # fmt: skip
    _write_jsonl(run / "events.jsonl", events)
    final_val = next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None)
    if final_val_loss is not None:
        final_val = final_val_loss
    (run / "summary.json").write_text(
        json.dumps(
            {
                "recipe": recipe,
                "steps": steps,
                "final_val_loss": final_val,
                "final_val_ppl": None if final_val is None else math.exp(final_val),
                "tokens_per_s": 5000.0 + offset,
                "skipped_steps": 0,
                "diverged": nan_from is not None,
            }
        ),
        encoding="utf-8",
    )
    return run


def make_seeded_comparison(
    root: Path, val_losses: dict[str, list[float]], seeds: tuple[int, ...] = (0, 1, 2)
) -> Path:
    """A multi-seed comparison ``root/cmp/<recipe>/seed<k>/`` (as ``mxfp8 compare --seeds``
    writes it), each run's final validation loss given, seed by seed, by ``val_losses``."""
    cmp_dir = root / "cmp"
    for recipe, losses in val_losses.items():
        for k, loss in zip(seeds, losses, strict=True):
            make_run(cmp_dir / recipe, recipe, dirname=f"seed{k}", seed=k, steps=30,
                     eval_every=10, telemetry_every=10, offset=loss - 2.2,
                     final_val_loss=loss)  # fmt: skip
    index = {"recipes": list(val_losses), "seeds": list(seeds)}
    (cmp_dir / "comparison.json").write_text(json.dumps(index))
    return cmp_dir


def make_comparison(root: Path) -> Path:
    """A comparison directory: bf16, mxfp8 (tiny gap), mxfp8-floor (a spike it recovers
    from), fp8-tensorwise (goes NaN at step 50)."""
    cmp_dir = root / "cmp"
    make_run(cmp_dir, "bf16", seed=1)
    make_run(cmp_dir, "mxfp8", offset=0.01, seed=1)
    make_run(cmp_dir, "mxfp8-floor", offset=0.08, spike_at=30, seed=1)
    make_run(cmp_dir, "fp8-tensorwise", offset=0.05, tensorwise=True, nan_from=50, seed=1)
    return cmp_dir


def make_planned_comparison(
    out: Path, val_losses: dict[str, list[float]], seeds: tuple[int, ...], steps: int = 30
) -> list[str]:
    """Complete runs of ``mxfp8 compare --out OUT --steps STEPS --recipes ... --seeds ...``, as
    its planner expects them (each run's exact config.toml, a summary.json of all its steps,
    the final validation loss from ``val_losses``, seed by seed), so that the command skips
    training and only reports. Returns those command-line arguments."""
    from mxfp8.compare import plan, with_compare_defaults
    from mxfp8.config.train_config import load_config

    overrides = {"run.steps": steps}
    base = with_compare_defaults(load_config(None, overrides), set(overrides))
    for p in plan(base, list(val_losses), out, seeds):
        assert p.seed is not None
        loss = val_losses[p.recipe][seeds.index(p.seed)]
        p.run_dir.mkdir(parents=True)
        p.cfg.save(p.run_dir / "config.toml")
        summary = {"recipe": p.recipe, "steps": steps, "final_val_loss": loss,
                   "final_val_ppl": math.exp(loss), "diverged": False}  # fmt: skip
        (p.run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return ["compare", "--out", str(out), "--steps", str(steps), "--recipes",
            ",".join(val_losses), "--seeds", ",".join(map(str, seeds))]  # fmt: skip
