"""The report opens in a real browser (headless Chromium) with no console errors and every
figure decoded. Skips, saying why, only when no Chromium binary is installed."""

from __future__ import annotations

import re

import pytest
from headless import find_chromium, open_page
from runfactory import make_run

from mxfp8.report.html import write_report

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary (install the Debian package `chromium` to run the browser check)",
)
IMAGES_OK = "document.body.getAttribute('data-images-ok')"


def test_report_renders_without_console_errors(comparison_report):
    _, path = comparison_report
    n_images = len(re.findall(r"<img ", path.read_text()))
    result = open_page(path, IMAGES_OK, CHROMIUM)
    assert result.errors == []
    assert result.value == str(n_images) and n_images > 0


def test_the_check_catches_a_broken_figure(tmp_path):
    """Negative control: corrupt one embedded PNG; the page must then report an error."""
    path = write_report(make_run(tmp_path, "bf16", steps=5))
    page = path.read_text()
    broken = re.sub(r"base64,[^\"]{64}", "base64,AAAA", page, count=1)
    assert broken != page
    path.write_text(broken)
    result = open_page(path, IMAGES_OK, CHROMIUM)
    assert any("failed to decode" in e for e in result.errors), result.errors
