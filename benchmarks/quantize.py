"""MX quantization throughput against the memory ceiling, measured side by side in one run.

For the same 8192x8192 fp32 and bf16 tensors, prints GB/s of *input* read for:
- ``copy_``: ``out.copy_(x)`` into a preallocated buffer (the ceiling);
- ``quantize`` and ``fake_quantize``, eager and ``compiled=True``, each with fresh outputs
  and with preallocated ``out=`` buffers (fresh large allocations are page-fault bound on
  CPU, so the hot loops of the emulated GEMMs should reuse buffers);
- ``fake_quantize`` along ``dim=0`` (the wgrad copies of the linear layer) and
  ``fake_quantize_rowcol`` (both copies of one tensor, as the layer makes them for x and dy);
and the ratio of each to ``copy_``. Target: quantize >= 50 % of copy_ bandwidth.

Usage: python benchmarks/quantize.py [--size 8192] [--repeats 5] [--threads N] [--skip-eager]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from mxfp8 import fake_quantize, quantize


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up (which also compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(x: torch.Tensor, repeats: int, skip_eager: bool = False) -> list[tuple[str, float]]:
    """(name, seconds) for every variant on one input tensor."""
    copy_out = torch.empty_like(x)
    fake_out = torch.empty_like(x)
    pair_out = (torch.empty_like(x), torch.empty_like(x))
    mx_out = quantize(torch.zeros_like(x))
    cases: list[tuple[str, Callable[[], object]]] = [
        ("copy_ (ceiling)", lambda: copy_out.copy_(x)),
        ("quantize eager", lambda: quantize(x)),
        ("quantize eager, out=", lambda: quantize(x, out=mx_out)),
        ("quantize compiled", lambda: quantize(x, compiled=True)),
        ("quantize compiled, out=", lambda: quantize(x, compiled=True, out=mx_out)),
        ("fake_quantize eager", lambda: fake_quantize(x)),
        ("fake_quantize compiled", lambda: fake_quantize(x, compiled=True)),
        ("fake_quantize compiled, out=", lambda: fake_quantize(x, compiled=True, out=fake_out)),
        (
            "fake_quantize dim=0 compiled, out=",
            lambda: fake_quantize(x, dim=0, compiled=True, out=fake_out),
        ),
    ]
    try:  # absent in older versions of the package (kept so that they can be compared)
        from mxfp8.numerics.rowcol import fake_quantize_rowcol
    except ImportError:
        pass
    else:
        cases.append(
            (
                "rowcol (both copies), out=",
                lambda: fake_quantize_rowcol(x, compiled=True, out=pair_out),
            )
        )
    if skip_eager:
        cases = [c for c in cases if "eager" not in c[0]]
    return [(name, _time(fn, repeats)) for name, fn in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="the tensors are size x size")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--skip-eager", action="store_true", help="time compiled variants only")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default). On a shared, oversubscribed machine 1 thread "
        "avoids timing the wait for a descheduled OpenMP thread at every parallel region",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} (1 min)"
    )
    x32 = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    for x in (x32, x32.to(torch.bfloat16)):
        nbytes = x.numel() * x.element_size()
        print(f"\n{tuple(x.shape)} {x.dtype} ({nbytes / 2**20:.0f} MiB), E4M3 rceil, block 32")
        print(f"{'variant':34s} {'ms':>8s} {'GB/s in':>8s} {'vs copy_':>9s}")
        results = bench(x, args.repeats, args.skip_eager)
        ceiling = results[0][1]
        for name, seconds in results:
            gbps = nbytes / seconds / 1e9
            print(f"{name:34s} {seconds * 1e3:8.1f} {gbps:8.2f} {ceiling / seconds:8.0%}")
    print(f"\nload average after the run {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
