"""``mxfp8 quantize-stats FILE``: MX quantization statistics of every tensor in a checkpoint.

Reads a safetensors file, or a ``.pt`` file through ``torch.load(weights_only=True)`` (a
tensor, or dicts / lists of tensors, flattened to dotted names). For each floating-point
tensor and each format and scale rule it reports the SQNR, the % of saturated elements, the
% of non-zero elements flushed to zero and the histogram of block scale exponents. A table
by default, ``--json`` for machines.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mxfp8.numerics.formats import FORMATS, ScaleRule
from mxfp8.numerics.metrics import mx_quant_stats

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize-stats",
        help="MX quantization statistics of each tensor in a checkpoint file",
        description=__doc__.splitlines()[0].split(": ", 1)[-1],
    )
    p.add_argument("file", type=Path, help="a .safetensors file, or a .pt/.pth file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--block-size", type=int, default=32, help="elements per scale (32)")
    p.add_argument("--dim", type=int, default=-1, help="blocked dimension (-1: the last)")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the file, by (dotted) name, in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:  # a bare Exception subclass: make it a ValueError
            raise ValueError(str(err)) from err
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return dict(_flatten(obj, ""))


def _flatten(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix or "tensor", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _flatten(value, f"{prefix}.{i}" if prefix else str(i))


def tensor_report(x: torch.Tensor, block_size: int, dim: int) -> dict[str, Any]:
    """Shape, amax and one stats entry per (format, rule) for one tensor."""
    finite = x[x.isfinite()]
    amax = float(finite.abs().max()) if finite.numel() else 0.0
    blocked_dim = dim if x.dim() > 0 else -1
    stats = [
        mx_quant_stats(x, fmt, rule, block_size=block_size, dim=blocked_dim).to_dict()
        for fmt in FORMATS
        for rule in ScaleRule
    ]
    return {
        "shape": list(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "amax": amax,
        "nonfinite": int(x.numel() - finite.numel()),
        "stats": stats,
    }


def _hist_summary(hist: dict[int, int]) -> str:
    if not hist:
        return "-"
    mode = max(hist, key=lambda e: hist[e])
    return f"[{min(hist)}..{max(hist)}] mode {mode}"


def format_table(report: dict[str, Any]) -> str:
    header = (
        f"{'tensor':32s} {'shape':>14s} {'amax':>10s} {'fmt':4s} {'rule':5s} "
        f"{'SQNR dB':>8s} {'sat %':>7s} {'flush %':>7s}  scale exponents"
    )
    lines = [header, "-" * len(header)]
    for name, entry in report["tensors"].items():
        if "skipped" in entry:
            lines.append(f"{name:32s} skipped: {entry['skipped']}")
            continue
        shape = "x".join(str(s) for s in entry["shape"]) or "scalar"
        for i, s in enumerate(entry["stats"]):
            sqnr = "exact" if s["sqnr_db"] is None else f"{s['sqnr_db']:.2f}"
            lead = f"{name:32s} {shape:>14s} {entry['amax']:10.4g}" if i == 0 else " " * 58
            lines.append(
                f"{lead} {s['fmt']:4s} {s['rule']:5s} {sqnr:>8s} {s['saturated_pct']:7.3f} "
                f"{s['underflow_pct']:7.3f}  {_hist_summary(s['scale_exp_hist'])}"
            )
    return "\n".join(lines)


def build_report(path: Path, block_size: int, dim: int) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for name, x in load_tensors(path).items():
        if x.dtype not in _FLOATS:
            tensors[name] = {"shape": list(x.shape), "skipped": f"dtype {x.dtype}"}
        elif x.dim() > 0 and not -x.dim() <= dim < x.dim():
            tensors[name] = {"shape": list(x.shape), "skipped": f"no dim {dim}"}
        else:
            tensors[name] = tensor_report(x, block_size, dim)
    return {"file": str(path), "block_size": block_size, "dim": dim, "tensors": tensors}


def run(args: argparse.Namespace) -> int:
    if args.block_size < 1:
        print("error: --block-size must be >= 1", file=sys.stderr)
        return 2
    try:
        report = build_report(args.file, args.block_size, args.dim)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        print(f"error: cannot read {args.file}: {err}", file=sys.stderr)
        return 1
    if args.json:
        # JSON object keys are strings: the histogram exponents become "-7" etc.
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0
