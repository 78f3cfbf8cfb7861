"""Where a run's numbers go: ``metrics.jsonl``, the terminal progress bar, TensorBoard.

``metrics.jsonl`` is the contract with reports (see docs/architecture.md): one JSON object per
logged step. On resume, lines past the checkpoint's step (written after it by the interrupted
process) are dropped first, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

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
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """Appends metrics to ``metrics.jsonl`` (and TensorBoard), and drives the progress bar."""

    def __init__(self, run_dir: Path, *, total: int, start: int, progress: bool):
        self.path = run_dir / METRICS_FILE
        kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= start]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
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
        self._file.write(json.dumps(metrics) + "\n")
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
        self._file.close()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
