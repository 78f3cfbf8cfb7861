"""The ``inductor`` kernel: the block math of :mod:`.eager` under ``torch.compile``.

One compiled region per (kernel function, element format, scale rule, input dtype), made with
``isolate_recompiles=True``: each region counts its own graphs against
:data:`RECOMPILE_LIMIT`, so a run that mixes formats, rules, dtypes and many layer shapes never
hits dynamo's limit for one configuration because of another, and dynamo's global settings are
left as the user set them. ``dynamic=None``: a region's first shape compiles static, a second
shape recompiles with dynamic sizes; graphs are also specialized on strides (a transposed view)
and on sizes of 1, hence the headroom. ``fullgraph=True`` makes passing the limit an error
rather than a silent fall-back to eager.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mxfp8.numerics.formats import ElemFormat, ScaleRule

RECOMPILE_LIMIT = 64
"""Graphs per compiled region before dynamo gives up (see the module doc)."""


@functools.cache
def compiled(fn: Callable, fmt: ElemFormat, rule: ScaleRule, dtype: torch.dtype) -> Callable:
    """``fn`` compiled for one (format, rule, input dtype); the arguments other than ``fn``
    only key the region (``fn`` still takes the format and rule as arguments)."""
    return torch.compile(
        fn, fullgraph=True, dynamic=None, recompile_limit=RECOMPILE_LIMIT, isolate_recompiles=True
    )


def block_kernel(fn: Callable, compile_it: bool, fmt, rule, dtype) -> Callable:
    """A block kernel of :mod:`.eager` as a call should run it: traced branch-free (``fused``)
    inside a caller's torch.compile, which then fuses it itself; compiled here when asked;
    else eagerly."""
    if torch.compiler.is_compiling():
        return functools.partial(fn, fused=True)
    if compile_it:
        return functools.partial(compiled(fn, fmt, rule, dtype), fused=True)
    return fn
