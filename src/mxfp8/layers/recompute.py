"""Is this forward a recomputation? (activation checkpointing replays forwards in backward)

Activation checkpointing runs a block's forward twice: once in the forward pass (keeping only
its inputs) and again during backward, to rebuild what backward needs. The second run must
compute exactly the same values, and it must not count as another observation of the step:
delayed scaling would record its amaxes again (and, outside a step window, commit a history
step), and telemetry would see every operand twice. Whoever replays a forward wraps it in
:func:`recomputing`; MX layers ask :func:`is_recomputing` and then neither record amaxes nor
call their observer. The quantization itself is unchanged: the same scales, the same values.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()  # autograd may run backward on another thread than forward


def is_recomputing() -> bool:
    """True inside :func:`recomputing` on this thread."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the forwards run inside as recomputations (nestable)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
