"""Golden loss curves of a 20-step deterministic run (bf16 and mxfp8); see train/golden.

The curves are exact only where they were recorded; the weight-operand fingerprint is exact
on any machine and tells the rceil recipe (mxfp8) from floor (mxfp8-floor).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mxfp8.numerics.formats import E4M3
from mxfp8.numerics.reference import ref_quantize
from mxfp8.train import golden


@pytest.mark.parametrize("recipe", golden.RECIPES)
def test_golden_curve(recipe, tmp_path, data_cache):
    metrics = golden.run_golden(recipe, tmp_path, cache_dir=data_cache)
    with golden.torch_threads(golden.THREADS):
        env = golden.environment()
    exact, problems = golden.compare(recipe, metrics, env)
    assert not problems, (
        f"{recipe} curve differs from {golden.golden_path(recipe).name} "
        f"({'exact' if exact else 'tolerant'} check; regenerate with "
        f"`python -m mxfp8.train.golden` only for an intended change):\n" + "\n".join(problems)
    )


def test_golden_files_hold_a_decreasing_curve():
    for recipe in golden.RECIPES:
        g = golden.load(recipe)
        losses = [m["loss"] for m in g["metrics"]]
        assert len(losses) == golden.STEPS
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
        assert g["environment"]["threads"] == golden.THREADS


def test_compare_detects_a_change():
    g = golden.load("mxfp8")
    bumped = [dict(m) for m in g["metrics"]]
    bumped[7]["loss"] += 1e-6
    exact, problems = golden.compare("mxfp8", bumped, g["environment"])
    assert exact and len(problems) == 1 and "step 8" in problems[0]
    other_env = {**g["environment"], "cpu_capability": "elsewhere"}
    exact, problems = golden.compare("mxfp8", bumped, other_env)
    assert not exact and not problems  # within the documented tolerance
    bumped[7]["loss"] += 0.1
    assert golden.compare("mxfp8", bumped, other_env)[1]


def _stored_fingerprint() -> dict:
    return golden.load(golden.FINGERPRINT_FILE)[golden.FINGERPRINT_KEY]


@pytest.fixture(scope="module")
def fingerprint() -> dict:
    return golden.operand_fingerprint()


def test_weight_operand_fingerprint_is_exact_on_any_machine(fingerprint):
    """mxfp8 matches its own digests and mxfp8-floor its own, bit for bit, anywhere."""
    want = _stored_fingerprint()
    for recipe in golden.FINGERPRINT_RECIPES:
        assert fingerprint["recipes"][recipe] == want["recipes"][recipe], (
            f"{recipe}: the first step's quantized weight operands changed (regenerate with "
            "`python -m mxfp8.train.golden --recipes mxfp8 --operands-only` only for an "
            "intended numerics change)"
        )
    assert fingerprint == want


def test_weight_operand_fingerprint_tells_rceil_from_floor():
    want = _stored_fingerprint()
    rceil, floor = (want["recipes"][r] for r in golden.FINGERPRINT_RECIPES)
    for gemm in golden.FINGERPRINT_GEMMS:
        assert rceil[gemm]["scale_sha256"] != floor[gemm]["scale_sha256"]
        assert rceil[gemm]["data_sha256"] != floor[gemm]["data_sha256"]
        assert 0 < want["scale_blocks_differ"][gemm] < want["scale_blocks"][gemm]


def test_weight_operand_fingerprint_is_the_reference_quantization():
    """The stored digests, recomputed from the spec's reference quantizer on the fingerprint
    weights; and the rceil/floor difference counted from the block maxima by hand: the
    rules pick different scales exactly where the amax mantissa is above 1.75."""
    want = _stored_fingerprint()
    model = golden.fingerprint_model("mxfp8")
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight.detach().numpy() for n in want["layers"]}
    assert len(weights) == 14  # 2 blocks x (wq, wk, wv, wo, w1, w3, w2)
    for recipe, rule in zip(golden.FINGERPRINT_RECIPES, ("rceil", "floor"), strict=True):
        for gemm, dim in (("fprop", -1), ("dgrad", 0)):  # W along K; W^T along N = W's dim 0
            data, scale = hashlib.sha256(), hashlib.sha256()
            for w in weights.values():
                codes, bits = ref_quantize(w, E4M3, scale_rule=rule, dim=dim)
                data.update(np.ascontiguousarray(codes).tobytes())
                scale.update(np.ascontiguousarray(bits).tobytes())
            assert want["recipes"][recipe][gemm] == {
                "data_sha256": data.hexdigest(),
                "scale_sha256": scale.hexdigest(),
            }, (recipe, gemm)
    for gemm, axis in (("fprop", 1), ("dgrad", 0)):
        blocks = differ = 0
        for w in weights.values():
            a = np.abs(w.astype(np.float64))
            amax = (
                a.reshape(a.shape[0], -1, 32).max(axis=2)
                if axis
                else a.reshape(-1, 32, a.shape[1]).max(axis=1)
            )
            mantissa, _ = np.frexp(amax)  # amax = mantissa * 2^k, mantissa in [0.5, 1)
            blocks += amax.size
            differ += int((2 * mantissa > 1.75).sum())
        assert (blocks, differ) == (want["scale_blocks"][gemm], want["scale_blocks_differ"][gemm])


def test_native_bf16_instructions_take_the_curves_off_the_exact_check():
    """cpu_capability reads AVX512 with and without AVX512-BF16 / AMX, whose bf16 GEMMs
    differ in the last bits: the recorded environment must name them for atol=0 to apply."""
    want = golden.load("bf16")
    env = want["environment"]
    exact, problems = golden.compare("bf16", want["metrics"], env)
    assert exact and not problems
    other = "none" if env["cpu_bf16"] != "none" else "avx512_bf16,amx"
    exact, _ = golden.compare("bf16", want["metrics"], {**env, "cpu_bf16": other})
    assert not exact
    assert "cpu_bf16" in golden.environment() and "cpu_bf16" in golden.ENV_KEYS
