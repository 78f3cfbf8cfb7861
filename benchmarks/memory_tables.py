"""The tables ``benchmarks/memory.py`` prints from its children's results, and the targets it
reminds of."""

from __future__ import annotations

from typing import Any

from memory_probe import LIVE_KINDS, MIB

AC_SUFFIX = "+ac"  # config name suffix: block activation checkpointing
TARGETS = (
    ("peak", "mxfp8", 0.85, "mxfp8 peak / bf16 peak"),
    ("linear_saved", "mxfp8", 0.60, "mxfp8 linear-layer saved bytes / bf16"),
    ("peak", "mxfp8" + AC_SUFFIX, 0.75, "mxfp8+ac peak / bf16 peak (no checkpointing)"),
)


def _mib(n: int | None) -> str:
    return f"{n / MIB:9.1f}" if n is not None else f"{'-':>9}"


def _ratio(n: int | None, ref: int | None) -> str:
    return f"{n / ref:5.2f}" if n is not None and ref else f"{'-':>5}"


COLUMNS = (
    ("live_peak", "live peak"),
    ("peak", "peak"),
    ("net_peak", "net peak"),
    ("saved", "saved"),
    ("linear_saved", "lin saved"),
    ("block_linear_saved", "blk saved"),
    ("resident_after", "resident"),
)


def print_tables(results: dict[str, dict[str, Any]], ref: dict[str, Any] | None) -> None:
    print("\nMiB, and x bf16 (no checkpointing). live peak: tensor bytes alive at the step's peak")
    print("(torch's MemTracker; what max_memory_allocated reports on a GPU). peak: peak RSS.")
    print("net peak: the peak less what the process held at")
    print("the step's start besides weights, AdamW states and MX scratch (the runtime; on CPU")
    print("~the torch libraries and compiled kernels). saved: bytes saved for backward by the")
    print("(first) forward; lin: inside nn.Linear/MXLinear forwards; blk: the block linears (the")
    print("ones MX converts, no LM head). resident: after optimizer.step and zero_grad")
    head = f"{'config':<20}" + "".join(f" {title:>9} {'x':>5}" for _, title in COLUMNS)
    print(head)
    for name, r in results.items():
        cells = "".join(
            f" {_mib(r[k])} {_ratio(r[k], ref[k] if ref else None)}" for k, _ in COLUMNS
        )
        print(f"{name:<20}{cells}")
    methods = {r["peak_method"] for r in results.values()}
    print(f"peak measured by: {', '.join(sorted(methods))}")

    shown = [n for n, r in results.items() if r["recipe"] in ("bf16", "mxfp8")]
    if not shown:
        return
    rows = (
        ("weights", "weights (fp32 master)"),
        ("gradients", "gradients"),
        ("adamw_states", "AdamW states"),
        ("saved_activations", "saved activations"),
        ("caches", "MX weight caches"),
        ("scratch", "MX scratch buffers"),
        ("runtime", "runtime at step start"),
    )
    print("\nHow the peak divides (MiB). Caches: the MX weight operands, after the forward;")
    print("runtime: as for the net peak; the rest: transients at the peak and allocator slack")
    print("(negative where the parts above are not all live at the peak)")
    print(f"{'':<24}" + "".join(f" {n:>12}" for n in shown))
    for key, label in rows:
        cells = "".join(f" {_mib(results[n]['breakdown'][key]):>12}" for n in shown)
        print(f"{label:<24}{cells}")
    cells = "".join(f" {_mib(results[n]['baseline']):>12}" for n in shown)
    print(f"{'  of which before model':<24}{cells}")
    rest = []
    for n in shown:
        parts = results[n]["breakdown"].values()
        known = None if None in parts else sum(parts)
        rest.append(f" {_mib(None if known is None else results[n]['peak'] - known):>12}")
    print(f"{'rest of the peak':<24}{''.join(rest)}")
    print(f"{'peak':<24}" + "".join(f" {_mib(results[n]['peak']):>12}" for n in shown))
    print("\nHow the live peak divides (MiB; MemTracker's kinds: Activation = made in forward or")
    print("in a checkpointed recompute, Temp = made in backward, activation gradients included)")
    print(f"{'':<24}" + "".join(f" {n:>12}" for n in results))
    for kind in LIVE_KINDS:
        cells = "".join(f" {_mib(r['live'].get(kind)):>12}" for r in results.values())
        print(f"{kind:<24}{cells}")
    cells = "".join(f" {_mib(r['live_peak']):>12}" for r in results.values())
    print(f"{'live peak':<24}{cells}")


def print_targets(results: dict[str, dict[str, Any]], ref: dict[str, Any] | None) -> None:
    print("\nTargets (a reminder, not a test):")
    for key, name, target, label in TARGETS:
        r = results.get(name)
        got = f"{r[key] / ref[key]:.2f}x" if r and ref and ref[key] else "not measured"
        if key == "peak" and r and ref and r["net_peak"] and ref["net_peak"]:
            got += f" (net peak {r['net_peak'] / ref['net_peak']:.2f}x)"
        print(f"  {label:<46} {got:>26}   target <= {target:.2f}x")
