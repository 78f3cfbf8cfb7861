"""Where a run's numbers go: ``metrics.jsonl``, the terminal progress bar, TensorBoard.

``metrics.jsonl`` is the contract with reports (see docs/architecture.md): one JSON object per
logged step, strict JSON (a non-finite value is ``null``, named in ``nonfinite_values``). On
resume, lines past the checkpoint's step (written after it by the interrupted process) are
dropped first, so the file reads as if the run had never stopped. Reading and that repair are
:mod:`mxfp8.stats.jsonl`'s, shared with the stats files: the file is replaced atomically
(never rewritten in place), and a line torn by a crash is dropped with a warning.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from mxfp8.stats.jsonl import encode_row, read_rows, truncate_after

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

# keys that depend on the machine's speed, not on the computation (left out of exact checks)
TIMING_KEYS = ("tokens_per_s", "step_time_s", "peak_mem_mb")


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` ([] if missing); a torn line is skipped with a
    :class:`~mxfp8.stats.jsonl.CorruptLineWarning`."""
    return read_rows(Path(run_dir) / METRICS_FILE)


class RunLog:
    """Appends metrics to ``metrics.jsonl`` (and TensorBoard), and drives the progress bar."""

    def __init__(self, run_dir: Path, *, total: int, start: int, progress: bool,
                 enabled: bool = True):  # fmt: skip
        """``enabled=False`` (ranks other than 0): writes and shows nothing."""
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        # atomic, and drops a torn last line: the rows appended below start on a fresh line
        truncate_after(self.path, start)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._tb = None
        try:  # TensorBoard is an optional extra
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
        except ImportError:
            pass
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def step_done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log(self, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        # strict JSON: a NaN loss is written null and named (mxfp8.stats.jsonl)
        self._file.write(json.dumps(encode_row(metrics), allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, metrics["step"])
        if self._bar is not None:
            show = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
            if metrics.get("skipped_steps"):
                show["skipped"] = metrics["skipped_steps"]
            show["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self._bar.set_postfix(show, refresh=False)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
