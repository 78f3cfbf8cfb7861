"""What MX layers keep in memory: MX-stored operands, the shared input copy, the weight cache
as FP8, the shared scratch pool, inference without backward copies, saved_input = bf16.

Each test checks the bytes (through ``saved_tensors_hooks``, as activation checkpointing and
benchmarks/memory.py see them) and that the numbers stay bit-identical to the layers'
reference behaviour (no sharing, no pool, no cache), which test_linear_exact.py ties to an
explicit computation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mxfp8.layers.convert import convert_model
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recipe import recipe
from mxfp8.layers.scratch import POOL
from mxfp8.layers.step import step_window

M, K, N = 96, 64, 128  # 96 tokens: three full token blocks


def _data(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


class Saved:
    """Distinct storages saved for backward (parameters excluded): {ptr: (dtype, bytes)}."""

    def __init__(self, params) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.found: dict[int, tuple[torch.dtype, int]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.found[ptr] = (t.dtype, t.untyped_storage().nbytes())
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.found.values())


def _layer(name="mxfp8", **over) -> MXLinear:
    torch.manual_seed(0)
    return MXLinear.from_linear(nn.Linear(K, N, bias=False), recipe(name, **over))


def test_the_wgrad_copy_of_x_is_saved_as_fp8_codes_and_scales():
    layer = _layer()
    x = _data(1, M, K).requires_grad_(True)
    saved = Saved(layer.parameters())
    with saved.hooks(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    dtypes = sorted(str(d) for d, _ in saved.found.values())
    assert dtypes == ["torch.float8_e4m3fn", "torch.float8_e8m0fnu"], saved.found
    assert saved.nbytes == M * K + (M // 32) * K  # 8.25 bits per element, nothing else


def test_saved_input_bf16_saves_x_in_bf16_and_is_exact_for_bf16_inputs():
    x = _data(2, M, K).to(torch.bfloat16)
    dy = _data(3, M, N).to(torch.bfloat16)
    results, sizes = [], []
    for mode in ("mx", "bf16"):
        layer = _layer(saved_input=mode)
        xi = x.clone().requires_grad_(True)
        saved = Saved(layer.parameters())
        with saved.hooks(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.backward(dy)
        results.append((y, xi.grad, layer.weight.grad))
        sizes.append(saved.nbytes)
        if mode == "bf16":  # a bf16 x is saved as it is: the input's own storage, no copy
            assert list(saved.found) == [xi.untyped_storage().data_ptr()]
    assert sizes == [M * K + (M // 32) * K, 2 * M * K]
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_saved_input_bf16_of_an_fp32_input_rounds_twice_but_stays_close():
    x = _data(4, M, K)  # fp32, as after the model's fp32 RMSNorm
    dy = _data(5, M, N).to(torch.bfloat16)
    grads, sizes = [], []
    for mode in ("mx", "bf16"):
        layer = _layer(saved_input=mode)
        saved = Saved(layer.parameters())
        with saved.hooks(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x.clone().requires_grad_(True))
        y.backward(dy)
        grads.append(layer.weight.grad)
        sizes.append(saved.nbytes)
    assert sizes == [M * K + (M // 32) * K, 2 * M * K]
    err = (grads[0] - grads[1]).pow(2).sum() / grads[0].pow(2).sum()
    assert 0 < err < 1e-3, err  # fp32 -> bf16 -> FP8 differs from fp32 -> FP8, a little


class QKV(nn.Module):
    """Three layers reading one input, as q/k/v do."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(K, N, bias=False) for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) * 2 + self.v(x) * 3


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_layers_reading_one_input_share_its_copies(compiled):
    x = _data(6, M, K)
    dy = _data(7, M, N).to(torch.bfloat16)
    out = []
    for share in (True, False):
        torch.manual_seed(0)
        model = convert_model(QKV(), recipe("mxfp8", convert=("*",)), compile_quantize=compiled)
        for m in model.modules():
            if isinstance(m, MXLinear):
                m.reuse_buffers = share
        xi = x.clone().requires_grad_(True)
        saved = Saved(model.parameters())
        with step_window(model):
            with saved.hooks(), torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(xi)
            y.backward(dy)
        out.append((saved.nbytes, y, xi.grad, *(p.grad for p in model.parameters())))
    shared_bytes, alone_bytes = out[0][0], out[1][0]
    one_copy = M * K + (M // 32) * K
    assert shared_bytes < alone_bytes
    assert alone_bytes - shared_bytes == 2 * one_copy  # two of the three copies are gone
    for a, b in zip(out[0][1:], out[1][1:], strict=True):
        assert torch.equal(a, b)


def test_an_input_changed_in_place_is_not_shared():
    layer_a, layer_b = _layer(), _layer()
    x = _data(8, M, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer_a(x.requires_grad_(False).clone().requires_grad_(True))
        base = x.clone()
        y1 = layer_b(base.requires_grad_(True))
        with torch.no_grad():
            base.mul_(2)  # same storage, new version: the next forward must not reuse
        y2 = layer_b(base)
    assert not torch.equal(y1, y2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _layer()(base.detach().clone())
    assert torch.equal(y2, ref)


def test_the_weight_cache_holds_fp8_copies_and_only_in_a_window():
    layer = _layer()
    x = _data(9, M, K).requires_grad_(True)
    with step_window(layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).sum().backward()
        held = layer.weight_cache_nbytes()
        dtypes = {t.dtype for s in layer._weight_cache.values() for t in (s.q.data, s.q.scale)}
    assert held == 2 * (N * K + N * K // 32)  # two copies, FP8 plus E8M0: 8.25 bits each
    assert dtypes == {torch.float8_e4m3fn, torch.float8_e8m0fnu}
    assert layer.weight_cache_nbytes() == 0  # the window closed
    model = convert_model(nn.Sequential(nn.Linear(K, N)), recipe("mxfp8", convert=("*",)))
    assert model.mxfp8_report.weight_cache_bytes == held
    assert "weight cache at most" in str(model.mxfp8_report)


def test_inference_makes_no_backward_copies():
    layer = _layer()
    x = _data(10, M, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            before = layer.weight_quantizations
            y = layer(x)
            assert layer.weight_quantizations == before + 1  # W along K only, no W^T copy
        assert y.grad_fn is None
        ref = layer(x.clone().requires_grad_(True))  # the training path: same output
    assert torch.equal(y, ref.detach())


def test_one_scratch_pool_sized_to_the_largest_operand():
    POOL.clear()
    shapes = [(K, N), (N, K), (K, 2 * N)]
    layers = [MXLinear.from_linear(nn.Linear(i, o, bias=False), recipe("mxfp8"))
              for i, o in shapes]  # fmt: skip
    x = _data(11, M, K).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = layers[0](x)
        h = layers[1](h)
        h = layers[2](h)
    h.float().sum().backward()
    largest_in = max(i for i, _ in shapes)
    largest_out = max(o for _, o in shapes)
    # x role: the largest input; dy and dyT roles: the largest output; all bf16 (2 bytes)
    assert POOL.nbytes() == 2 * M * (largest_in + 2 * largest_out)
    per_layer = sum(2 * M * (i + 2 * o) for i, o in shapes)
    assert POOL.nbytes() < per_layer
