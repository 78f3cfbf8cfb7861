"""Fixtures of the report tests: one synthetic comparison and its report, built once per
session because rendering a dozen figures takes seconds on 2 cores."""

from __future__ import annotations

import pytest
from runfactory import make_comparison

from mxfp8.report.html import write_report


@pytest.fixture(scope="session")
def comparison_report(tmp_path_factory):
    """(comparison directory, report path). Treat as read-only: tests share it."""
    cmp_dir = make_comparison(tmp_path_factory.mktemp("report"))
    return cmp_dir, write_report(cmp_dir)
