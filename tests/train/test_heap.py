"""run.mmap_threshold_kib: glibc's mmap threshold fixed for the process, observed in RSS (a
fresh interpreter per case: the threshold is process-wide and glibc's default moves)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mxfp8.config.fields import ConfigError
from mxfp8.config.train_config import load_config
from mxfp8.train import golden
from mxfp8.train.loop import train

# 400 blocks of 512 KiB are allocated and freed, all but the last (which pins the heap's top,
# so that glibc cannot trim it): with glibc's dynamic threshold they come from the heap, which
# keeps the freed 200 MiB; with a 256 KiB threshold each is mapped and unmapped
PROBE = """
import ctypes, os, sys
from mxfp8.train.heap import set_mmap_threshold
if sys.argv[1] != "0":
    assert set_mmap_threshold(int(sys.argv[1])) is None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
libc.free(libc.malloc(512 * 1024))  # glibc's threshold rises past 512 KiB (the default)
blocks = []
for _ in range(400):
    p = libc.malloc(512 * 1024)
    ctypes.memset(p, 1, 512 * 1024)  # touch the pages: they count in RSS
    blocks.append(p)
before = rss_mib()
for p in blocks[:-1]:
    libc.free(p)
print(before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_fixed_threshold_gives_freed_large_blocks_back():
    freed = {}
    for kib in (0, 256):
        out = subprocess.run([sys.executable, "-c", PROBE, str(kib)], capture_output=True,
                             text=True, check=True)  # fmt: skip
        freed[kib] = float(out.stdout.strip())
    assert freed[0] < 20, freed  # glibc's default keeps the freed 200 MiB in the heap
    assert freed[256] > 180, freed  # a fixed threshold returns them


def test_the_threshold_is_an_option_off_by_default_and_validated():
    assert load_config(overrides={}).run.mmap_threshold_kib == 0
    assert load_config(overrides={"run.memory": "lean"}).run.mmap_threshold_kib == 0
    over = {"run.memory": "lean", "run.mmap_threshold_kib": 256}
    assert load_config(overrides=over).run.mmap_threshold_kib == 256
    with pytest.raises(ConfigError, match="run.mmap_threshold_kib must be >= 0"):
        load_config(overrides={"run.mmap_threshold_kib": -1})


def test_a_run_with_the_threshold_says_so(tmp_path, data_cache, capsys):
    over = {**golden.OVERRIDES, "data.cache_dir": str(data_cache), "run.out": str(tmp_path),
            "run.steps": 1, "run.mmap_threshold_kib": 256, "run.progress": True}  # fmt: skip
    train(load_config(None, over))
    assert "glibc mmap threshold 256 KiB" in capsys.readouterr().err
