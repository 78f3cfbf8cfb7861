"""step_window: the span of one optimizer step, during which the weights cannot change.

The training loop wraps the forwards and backwards of one optimizer step (all its
micro-batches under gradient accumulation) in a window, and steps the optimizer outside it::

    with step_window(model):
        for micro in range(accum):
            loss = model(x, y)
            loss.backward()
    optimizer.step()

Two things hang on the window, for every :class:`~mxfp8.layers.linear.MXLinear` in ``model``:

- the quantized weight cache exists only inside it: the micro-batches of one step quantize
  each weight once; outside any window every forward quantizes the weight fresh, so no write
  to a weight (``.data`` included, which no version counter sees) can leave a stale copy.
  A window told ``micro_batches=1`` (the loop says how many forwards the step has) keeps no
  cache either: with one forward nothing is reused, and the cached copies (two FP8 copies
  of every weight, held until the window closes) would only add to the step's peak memory;
  the backward then quantizes the dgrad copy from the weight it saved;
- delayed scaling commits the previous step's pending amaxes when a window opens, so its
  history advances exactly once per window (outside windows: once per recording forward; see
  :mod:`mxfp8.layers.tensorwise_function`).

Why the loop says it rather than the layer inferring it: the layer cannot observe every write
to its weight, but the loop knows exactly when the optimizer runs.

Rules. Do not write the weights inside a window (the cache would serve the old values; a
replaced parameter or a tracked in-place op is still caught by the cache key). Windows do not
nest: opening one on a layer that is already in a window (the same model twice, or a model
and one of its submodules) raises ``RuntimeError`` before touching any layer, because a
silent inner window would either commit delayed-scaling amaxes twice per step or mean
nothing. The window always closes (caches dropped), also when the body raises. A model
without MXLinear layers (the ``bf16`` recipe) makes it a no-op, so a loop can always open one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from mxfp8.layers.linear import MXLinear


@contextlib.contextmanager
def step_window(model: nn.Module, *, micro_batches: int | None = None) -> Iterator[None]:
    """Open a step window on every :class:`MXLinear` of ``model`` (``model`` included).

    On entry, each layer drops its cached weight operands and commits its pending
    delayed-scaling amaxes; inside, weight operands are quantized once and reused (unless
    ``micro_batches`` is 1: then there is nothing to reuse and nothing is cached); on exit
    (normal or by an exception) the caches are dropped again. Raises ``RuntimeError`` if any
    of those layers is already inside a window (windows do not nest; nothing is changed).
    """
    layers = [m for m in model.modules() if isinstance(m, MXLinear)]  # modules(): no repeats
    busy = [m.name or type(m).__name__ for m in layers if m._window_open]
    if busy:
        raise RuntimeError(
            f"step_window is already open on {len(busy)} layer(s) of this model "
            f"(first: {busy[0]!r}); windows do not nest: open one per optimizer step"
        )
    if micro_batches is not None and micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    reuse = micro_batches is None or micro_batches > 1
    opened: list[MXLinear] = []
    try:
        for m in layers:
            m._open_window(reuse)
            opened.append(m)
        yield
    finally:
        for m in opened:
            m._close_window()
