"""A long-lived process quantizes many layer shapes and layouts through the compiled
kernels (a test suite, a notebook, a comparison of several models). Each distinct size/stride
pattern can be one more dynamo graph of the same compiled copy; with ``fullgraph=True``
passing dynamo's default limit (8 graphs) would be an error, not a slowdown (it was: the
distributed tests' in-process runs pushed a later training test past it)."""

from __future__ import annotations

import pytest
import torch

from mxfp8.numerics import quantize as q
from mxfp8.numerics.backends import inductor


@pytest.mark.slow  # about a minute of compilation; it fails without the raised limit
def test_many_shapes_and_layouts_compile_and_stay_exact():
    torch.manual_seed(0)
    # a fresh configuration (E5M2, floor, fp32 in/out): its compiled copies start empty
    fmt, rule = "e5m2", "floor"
    n = 0
    for rows in (32, 64, 96, 160, 1, 2):
        for cols in (32, 64, 96, 1):
            for transposed in (False, True):
                base = torch.randn(cols, rows) if transposed else torch.randn(rows, cols)
                x = base.t() if transposed else base
                for dim in (0, 1):
                    if x.shape[dim] % 32:
                        continue
                    got = q.quantize(x, fmt, dim=dim, scale_rule=rule, compiled=True)
                    want = q.quantize(x, fmt, dim=dim, scale_rule=rule)
                    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
                    assert torch.equal(got.scale.view(torch.uint8), want.scale.view(torch.uint8))
                    back = q.dequantize(got, torch.float32, compiled=True)
                    assert torch.equal(back, want.dequantize(torch.float32))
                    n += 1
    assert n >= 30
    assert torch._dynamo.config.recompile_limit == 8  # the global default is left alone
    assert inductor.RECOMPILE_LIMIT > 8
