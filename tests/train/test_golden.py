"""Golden loss curves of a 20-step deterministic run (bf16 and mxfp8); see train/golden."""

from __future__ import annotations

import pytest

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
