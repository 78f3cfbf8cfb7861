"""The instruments of ``benchmarks/memory.py``: the process's peak memory (RSS, or CUDA's
allocator), the bytes a step saves for backward (autograd's saved tensors, by storage, each
counted once) and the MX layers' scratch buffers."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mxfp8.layers.linear import MXLinear

MIB = 2**20


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class MemoryProbe:
    """Current and peak memory of this process: RSS on CPU, the caching allocator on CUDA.

    On CPU the peak must be the step's own, not the lifetime peak that ``ru_maxrss`` gives
    (the warm-up step compiles and allocates lazily, and may peak higher): writing ``5`` to
    ``/proc/self/clear_refs`` resets VmHWM to the current RSS. Where that fails, or the
    kernel accepts the write without resetting, the peak falls back to ``ru_maxrss`` and
    ``method`` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM"

    def current(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_bytes("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as e:
            self.method = f"ru_maxrss (lifetime peak, warm-up included: clear_refs: {e})"
            return
        hwm, rss = _proc_status_bytes("VmHWM"), _proc_status_bytes("VmRSS")
        if hwm is None or rss is None or hwm > rss + 4 * MIB:
            self.method = "ru_maxrss (lifetime peak, warm-up included: VmHWM did not reset)"

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.method == "VmHWM":
            return _proc_status_bytes("VmHWM") or _ru_maxrss_bytes()
        return _ru_maxrss_bytes()


# --- what the step holds --------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of t's storage; None for tensors without real storage."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
        return None
    return (st.data_ptr(), st.nbytes()) if st.data_ptr() else None


def _collect(obj: Any, out: dict[int, int], depth: int = 0) -> None:
    """Every tensor storage reachable from obj (tensors, tuples, lists, dicts, dataclasses,
    plain objects' attributes), into ``out`` as data pointer -> bytes."""
    if depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        key = _storage_key(obj)
        if key is not None:
            out[key[0]] = key[1]
    elif isinstance(obj, tuple | list | set):
        for v in obj:
            _collect(v, out, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _collect(getattr(obj, f.name), out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module | type):
        for v in vars(obj).values():
            _collect(v, out, depth + 1)


def nbytes(objs: Any, exclude: set[int] = frozenset()) -> int:
    found: dict[int, int] = {}
    _collect(objs, found)
    return sum(n for ptr, n in found.items() if ptr not in exclude)


class SavedTensors:
    """Bytes the forward saves for backward, in all and inside linear layers.

    A pack hook sees every tensor autograd saves (and returns it unchanged: nothing about the
    step's memory changes). Forward pre-hooks and hooks on every ``nn.Linear`` (MXLinear
    included) keep a stack of the linears being run, so a saved tensor is attributed to a
    linear when one is running; ``block`` marks those of the transformer blocks (the ones MX
    recipes convert; the LM head stays high precision). Each storage is counted once, whoever
    saves it; parameters are not counted (autocast's bf16 copies of weights are).

    Under (non-reentrant) activation checkpointing, what a checkpointed block saves in the
    first forward goes to the checkpoint's own, inner hook and is not counted (it is not kept);
    what it keeps, its inputs, torch saves through a no-op Function, which this hook sees.
    ``watch_inputs`` also counts the inputs of the checkpointed units from forward pre-hooks,
    so that they count whichever way a torch version holds them (each storage once).
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = {k[0] for p in model.parameters() if (k := _storage_key(p)) is not None}
        self.all: dict[int, int] = {}
        self.linear: set[int] = set()
        self.block: set[int] = set()
        self.stack: list[bool] = []
        self.active = False
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                m.register_forward_pre_hook(self._enter(name.startswith("layers.")))
                m.register_forward_hook(self._leave)

    def watch_inputs(self, modules: list[nn.Module]) -> None:
        for m in modules:
            m.register_forward_pre_hook(self._inputs)

    def _enter(self, block: bool):
        def hook(module: nn.Module, args: Any) -> None:
            if self.active:
                self.stack.append(block)

        return hook

    def _leave(self, module: nn.Module, args: Any, out: Any) -> None:
        # only in the counted forward: a checkpoint replay in backward stops early, without
        # running the forward hooks of the modules it did not finish
        if self.active and self.stack:
            self.stack.pop()

    def _inputs(self, module: nn.Module, args: Any) -> None:
        if self.active:
            for a in args:
                if isinstance(a, torch.Tensor):
                    self._add(a)

    def _add(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is None or key[0] in self.params:
            return
        self.all[key[0]] = key[1]
        if self.stack:
            self.linear.add(key[0])
            if self.stack[-1]:
                self.block.add(key[0])

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            self._add(t)
        return t

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Count what the forward run inside saves (the counts of an earlier one are reset)."""
        self.all.clear()
        self.linear.clear()
        self.block.clear()
        self.stack.clear()
        self.active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
        finally:
            self.active = False

    def totals(self) -> dict[str, int]:
        return {
            "saved": sum(self.all.values()),
            "linear_saved": sum(self.all[k] for k in self.linear),
            "block_linear_saved": sum(self.all[k] for k in self.block),
        }


def scratch_bytes(layers: list[MXLinear]) -> int:
    """Bytes of the MX layers' scratch buffers for operands that die within a call: the
    process-wide pool (:mod:`mxfp8.layers.scratch`) where the layers have one, else (older
    layers) each layer's own ``_scratch`` buffers."""
    total = nbytes([getattr(m, "_scratch", None) for m in layers])
    try:
        from mxfp8.layers.scratch import pool_nbytes
    except ImportError:
        return total
    return total + pool_nbytes()


LIVE_KINDS = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")


def live_peak(step, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Live tensor bytes at the peak of one ``step()``, in total and by kind (parameters,
    buffers, gradients, activations, temporaries, optimizer states), counted by torch's
    ``MemTracker`` (``torch.distributed._tools.mem_tracker``: a TorchDispatchMode that follows
    every storage from its creation until it is freed): what ``max_memory_allocated`` reports
    on a GPU, without the allocator's slack and the runtime that peak RSS carries on CPU."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    (by_kind,) = tracker.get_tracker_snapshot("peak").values()  # one device
    out = {"total": int(by_kind["Total"])}
    for kind, nbytes_ in by_kind.items():
        if kind != "Total":
            out[str(getattr(kind, "value", kind))] = int(nbytes_)
    return out
