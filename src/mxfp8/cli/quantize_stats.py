"""``mxfp8 quantize-stats FILE``: MX quantization statistics of every tensor in a checkpoint.

Reads a safetensors file, or a ``.pt`` file through ``torch.load(weights_only=True)`` (a
tensor, or dicts / lists of tensors, flattened to dotted names). For each floating-point
tensor and each format and scale rule it reports the SQNR, the % of saturated elements, the
% of non-zero elements flushed to zero and the histogram of block scale exponents, as
:mod:`mxfp8.numerics.metrics` defines them (the same numbers as the training telemetry). A
table by default, ``--json`` for machines.

The file may come from anywhere, so reading it never runs code from it: safetensors holds
only tensors, and ``weights_only=True`` restricts unpickling to tensors and plain containers
(a pickle that names a function to call is refused). Anything that is not such a file (a
malicious or random pickle, text, a directory, a checkpoint without a single tensor) is
reported as a :class:`~mxfp8.errors.UserError`: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mxfp8.errors import UserError
from mxfp8.numerics.formats import FORMATS, ScaleRule
from mxfp8.numerics.metrics import SQNR_CAP_DB, mx_quant_stats

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
    """Every tensor in the file, by (dotted) name, in file order.

    Raises :class:`UserError` (one line, naming the file) for anything that is not a
    readable file of tensors; nothing in the file is ever executed (see the module doc).
    """
    if path.is_dir():
        raise UserError(f"cannot read {path}: it is a directory, not a checkpoint file")
    if not path.exists():
        raise UserError(f"cannot read {path}: no such file")
    if not path.is_file():
        raise UserError(f"cannot read {path}: not a regular file")
    try:
        if path.suffix == ".safetensors":
            tensors = _load_safetensors(path)
        else:
            tensors = dict(_flatten(_torch_load(path), ""))
    except OSError as err:  # unreadable (permissions, I/O): say so, not "not a tensor file"
        raise UserError(f"cannot read {path}: {err.strerror or _one_line(err)}") from err
    except RecursionError as err:  # containers nested deeper than any checkpoint's
        raise UserError(f"cannot read {path}: its containers are nested too deeply") from err
    if not tensors:
        raise UserError(f"cannot read {path}: the file holds no tensors")
    return tensors


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as err:  # SafetensorError is a bare Exception subclass
        raise UserError(f"cannot read {path}: not a safetensors file ({_one_line(err)})") from err


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise here
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # a hostile or broken pickle fails in many ways: all bad input
        raise UserError(f"cannot read {path}: {_load_failure(err)}") from err


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_failure(err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words.

    torch's refusal is several paragraphs (advice to retry with ``weights_only=False``, which
    is exactly what must not be done with an untrusted file, how to allowlist globals, a docs
    link) around one sentence that says what it met (``Unsupported global: GLOBAL io.open
    ...``, ``Trying to load unsupported GLOBAL posix.system ...``): keep that sentence.
    """
    text = str(err)
    if text.startswith("Weights only load failed"):
        _, marker, rest = text.partition("WeightsUnpickler error:")
        paragraphs = [p.strip() for p in (rest if marker else text).split("\n\n") if p.strip()]
        if not marker:
            paragraphs = paragraphs[1:]  # the first one is the advice
        detail = next((p for p in paragraphs if not p.startswith("Check the documentation")), "")
        detail = detail.split(". ")[0].removesuffix(".")  # its first sentence
        refused = (
            "not a plain tensor file: torch.load(weights_only=True), which never runs code "
            "from the file, refused it"
        )
        return f"{refused} ({_one_line(detail)})" if detail else refused
    return f"not a PyTorch tensor file ({type(err).__name__}: {_one_line(err)})"


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


def _sqnr_cell(sqnr: float | None) -> str:
    """None: an all-zero tensor (no signal); the cap: exact or within rounding of it."""
    if sqnr is None:
        return "-"
    if sqnr >= SQNR_CAP_DB:
        return f">={SQNR_CAP_DB:.0f}"
    return f"{sqnr:.2f}"


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
            sqnr = _sqnr_cell(s["sqnr_db"])
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
        raise UserError("--block-size must be >= 1")
    report = build_report(args.file, args.block_size, args.dim)  # UserError: one line, status 2
    if args.json:
        # JSON object keys are strings: the histogram exponents become "-7" etc.
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(format_table(report))
    return 0
