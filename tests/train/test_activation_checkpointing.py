"""Activation checkpointing (``run.activation_checkpointing = block``): the same numbers for
less memory.

Each test compares a checkpointed model with a plain one built from the same seed, doing what
the training loop does (a step window around the micro-batches, bf16 autocast, backward of the
loss divided by the accumulation count): losses and gradients must be bit-identical, the block
must really run twice, delayed scaling and telemetry must see each forward once, and a whole
run (and a resume across the option) must log the same metrics.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import mxfp8
from mxfp8.checkpoint.resume import RESUMABLE_FIELDS
from mxfp8.config.fields import ConfigError
from mxfp8.config.sections import RunConfig
from mxfp8.config.train_config import load_config
from mxfp8.layers.convert import convert_model
from mxfp8.layers.linear import MXLinear
from mxfp8.layers.recompute import is_recomputing
from mxfp8.layers.step import step_window
from mxfp8.model.config import model_config
from mxfp8.model.transformer import ActivationCheckpointing, Transformer
from mxfp8.stats.telemetry import NUMERICS_FILE
from mxfp8.train import golden
from mxfp8.train.hooks import TrainHook
from mxfp8.train.loop import train
from mxfp8.train.runlog import TIMING_KEYS, read_metrics

# the golden run's shape (mxfp8.train.golden.OVERRIDES): every linear is whole MX blocks
CFG = model_config(
    "tiny",
    vocab_size=512,
    d_model=64,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    ffn_hidden=128,
    max_seq_len=32,
)
BATCH, SEQ = 4, 32


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here compares numbers bit for bit: one torch thread (tests/conftest.py)."""


def build(recipe: str, mode: str) -> Transformer:
    """The small model under ``recipe``, checkpointed or not; same weights for a given recipe."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    convert_model(model, mxfp8.recipe(recipe))
    return model.set_activation_checkpointing(mode)


def micro_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def forward_backward(model: Transformer, batches, window: bool = True) -> list[torch.Tensor]:
    """One optimizer step's forwards and backwards, as mxfp8.train.step.run_step does them."""
    losses = []
    with step_window(model) if window else contextlib.nullcontext():
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, y)
            losses.append(loss.detach())
            (loss / len(batches) if len(batches) > 1 else loss).backward()
    return losses


def grads(model: Transformer) -> dict[str, torch.Tensor]:
    out = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in out.values()), "every parameter gets a gradient"
    return out


def mx_layers(model: Transformer) -> list[MXLinear]:
    return [m for m in model.modules() if isinstance(m, MXLinear)]


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("recipe", ["bf16", "mxfp8"])
def test_losses_and_gradients_are_bit_identical(recipe, accum):
    batches = micro_batches(accum)
    plain, ckpt = build(recipe, "none"), build(recipe, "block")
    if recipe == "mxfp8":
        assert len(mx_layers(ckpt)) == 7 * CFG.n_layers  # the converted blocks are checkpointed
    losses_plain = forward_backward(plain, batches)
    losses_ckpt = forward_backward(ckpt, batches)
    assert all(torch.equal(a, b) for a, b in zip(losses_plain, losses_ckpt, strict=True))
    g_plain, g_ckpt = grads(plain), grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        assert torch.equal(g_plain[name], g_ckpt[name]), name


@pytest.mark.parametrize("mode, per_micro", [("none", [False]), ("block", [False, True])])
def test_block_forward_runs_again_in_backward_marked_as_recomputation(mode, per_micro):
    model = build("mxfp8", mode)
    calls: list[bool] = []
    # a pre-hook: the replay stops once backward has what it needs, before a post-hook runs
    model.layers[0].register_forward_pre_hook(lambda *_: calls.append(is_recomputing()))
    forward_backward(model, micro_batches(2))
    # the first forward runs plainly, its replay (in backward, before the next micro-batch)
    # inside mxfp8.layers.recompute.recomputing()
    assert calls == per_micro * 2
    assert not is_recomputing()


def test_eval_and_no_grad_forwards_are_not_checkpointed():
    model = build("mxfp8", "block")
    calls: list[bool] = []
    model.layers[0].register_forward_pre_hook(lambda *_: calls.append(is_recomputing()))
    x, y = micro_batches(1)[0]
    with torch.no_grad():
        model(x, y)  # training mode, no grad
    model.eval()
    _, loss = model(x, y)  # eval mode, grad enabled: a plain forward, plain backward
    loss.backward()
    assert calls == [False, False]


def saved_bytes(model: Transformer) -> int:
    """Bytes of the distinct storages kept for backward by one training forward: what
    autograd saves, plus the block inputs (which checkpointing keeps itself)."""
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    def block_inputs(module, args) -> None:
        for a in args:
            if isinstance(a, torch.Tensor):
                keep(a)

    handles = [b.register_forward_pre_hook(block_inputs) for b in model.layers]
    x, y = micro_batches(1)[0]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, y)
    finally:
        for h in handles:
            h.remove()
    loss.backward()  # still works: the hooks only looked
    return sum(storages.values())


@pytest.mark.parametrize("recipe", ["bf16", "mxfp8"])
def test_checkpointing_saves_less_for_backward(recipe):
    plain = saved_bytes(build(recipe, "none"))
    ckpt = saved_bytes(build(recipe, "block"))
    # the weights, embeddings, LM head and loss are kept either way; the blocks' activations
    # (several [B, T, d] and [B, T, ffn] tensors per block) only without checkpointing
    # (measured: 1.39 MB plain, 0.48 MB checkpointed, of which 0.4 MB are parameters)
    assert 2 * ckpt < plain


def count_records(model: Transformer) -> list[int]:
    """Wrap each layer's DelayedState.record to count its calls; returns the live counters."""
    counters = []
    for layer in mx_layers(model):
        state, counter = layer.delayed_state, [0]

        def record(operand, amax, _orig=state.record, _c=counter):
            _c[0] += 1
            _orig(operand, amax)

        state.record = record
        counters.append(counter)
    return counters


@pytest.mark.parametrize("window", [True, False], ids=["step-window", "no-window"])
def test_recomputation_does_not_advance_delayed_scaling(window):
    """Inside step windows (the loop) and outside them (each recording forward commits the
    previous one), histories, pending amaxes and the number of records match the plain run."""
    runs = {}
    for mode in ("none", "block"):
        model = build("fp8-delayed", mode)
        counters = count_records(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(3):
            forward_backward(model, micro_batches(2, seed=step), window=window)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[mode] = (model, [c[0] for c in counters])
    (plain_model, n_plain), (ckpt_model, n_ckpt) = runs["none"], runs["block"]
    plain, ckpt = mx_layers(plain_model), mx_layers(ckpt_model)
    assert n_ckpt == n_plain
    committed = 2 if window else 5  # a window commits the previous step; a forward, the last
    for a, b in zip(plain, ckpt, strict=True):
        for op in ("input", "weight", "grad_output"):
            ta, tb = a.delayed_state.trackers[op], b.delayed_state.trackers[op]
            assert ta.count == tb.count == committed, (a.name, op)
            assert torch.equal(ta.amax_history, tb.amax_history), (a.name, op)
            assert torch.equal(ta.scale(), tb.scale()), (a.name, op)
        pa, pb = a.delayed_state.pending, b.delayed_state.pending
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    # and the weights trained on those scales are the same
    for p, q in zip(plain_model.parameters(), ckpt_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("recipe", ["mxfp8", "fp8-delayed"])
def test_telemetry_sees_each_operand_once(recipe):
    seen = {}
    for mode in ("none", "block"):
        model = build(recipe, mode)
        calls: list[tuple[str, str, str]] = []
        for layer in mx_layers(model):
            layer.observer = lambda layer, gemm, operand, hp, q, _c=calls: _c.append(
                (layer.name, gemm, operand)
            )
        forward_backward(model, micro_batches(2))
        seen[mode] = (calls, grads(model))
    (plain, g_plain), (ckpt, g_ckpt) = seen["none"], seen["block"]
    # 6 operands per layer per micro-batch, in the same order
    assert len(plain) == 6 * 7 * CFG.n_layers * 2
    assert ckpt == plain
    # an observer switches MX layers to another (bit-equal) quantization path in the first
    # forward only; the replay, which has none, must rebuild the same saved operands
    for name in g_plain:
        assert torch.equal(g_plain[name], g_ckpt[name]), name


# --- the option, end to end ------------------------------------------------------------------


class CountReplays(TrainHook):
    """Counts the replays of the last block's forward in a run (the loop's model, converted)."""

    def __init__(self) -> None:
        self.replays = 0
        self.quantized = False

    def on_train_start(self, ctx) -> None:
        block = ctx.model.layers[-1]
        self.quantized = isinstance(block.feed_forward.w2, MXLinear)
        block.register_forward_pre_hook(lambda *_: self.count())

    def count(self) -> None:
        self.replays += is_recomputing()


def run(cfg, expect_replays: int) -> bool:
    """Train ``cfg``; check that the blocks were replayed as often as checkpointing says."""
    counter = CountReplays()
    result = train(cfg, hooks=[counter])
    assert counter.quantized and counter.replays == expect_replays
    return result.completed


def run_over(out, cache, **over):
    base = {**golden.OVERRIDES, "data.cache_dir": str(cache), "recipe.name": "mxfp8"}
    return load_config(None, {**base, "run.steps": 4, "run.grad_accum": 2,
                              "run.telemetry_every": 2, "run.out": str(out), **over})  # fmt: skip


def exact(run_dir) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in read_metrics(run_dir)]


def numerics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / NUMERICS_FILE).read_text().splitlines()]


def test_training_run_and_resume_match_the_plain_run(tmp_path, data_cache):
    micro = 4 * 2  # steps x grad_accum: the training forwards; evaluation is never replayed
    run(run_over(tmp_path / "plain", data_cache), expect_replays=0)
    cfg = run_over(tmp_path / "ckpt", data_cache, **{"run.activation_checkpointing": "block"})
    assert cfg.run.activation_checkpointing is ActivationCheckpointing.BLOCK
    run(cfg, expect_replays=micro)
    plain = exact(tmp_path / "plain")
    assert len(plain) == 4 and "val_loss" in plain[-1]
    assert exact(tmp_path / "ckpt") == plain
    telemetry = numerics(tmp_path / "plain")
    assert {r["step"] for r in telemetry} == {2, 4}
    assert numerics(tmp_path / "ckpt") == telemetry  # each operand measured once, same values

    # stopped with checkpointing, resumed without it: a resumable field, and exact
    assert "run.activation_checkpointing" in RESUMABLE_FIELDS
    part = tmp_path / "part"
    over = {"run.activation_checkpointing": "block", "run.stop_after": 2}
    assert not run(run_over(part, data_cache, **over), expect_replays=micro // 2)
    assert run(run_over(part, data_cache, **{"run.resume": True}), expect_replays=0)
    assert exact(part) == plain


def test_an_invalid_value_is_a_clear_config_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"run.activation_checkpointing": "layer"})
    msg = str(e.value)
    assert "run.activation_checkpointing" in msg and "'layer'" in msg and "{none|block}" in msg
    with pytest.raises(ConfigError, match=r"run\.activation_checkpointing.*\{none\|block\}"):
        RunConfig(activation_checkpointing="layers")  # type: ignore[arg-type]
    assert RunConfig().activation_checkpointing is ActivationCheckpointing.NONE
    block = RunConfig(activation_checkpointing="block")  # type: ignore[arg-type]
    assert block.activation_checkpointing is ActivationCheckpointing.BLOCK
    with pytest.raises(ValueError, match="choose one of 'none', 'block'"):
        Transformer(CFG).set_activation_checkpointing("all")


def test_whole_model_compile_with_checkpointing_is_refused():
    """torch.compile of the whole model recomputes in its own graph, whose numbers differ from
    the plain run's (seen on CPU in bf16): the option would no longer be 'memory and time,
    never numbers'. Compiled blocks are checkpointed from outside (test_compiled_blocks.py)."""
    with pytest.raises(ConfigError, match="run.activation_checkpointing = block cannot be "
                                          "combined with run.compile = model"):  # fmt: skip
        load_config(None, {"run.activation_checkpointing": "block", "run.compile": True})
    assert load_config(None, {"run.compile": True}).run.compile == "model"  # each alone is fine
    both = {"run.activation_checkpointing": "block", "run.compile": "block"}
    assert load_config(None, both).run.compile == "block"
