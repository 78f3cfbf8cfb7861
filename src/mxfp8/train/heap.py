"""glibc's mmap threshold for the training process (``run.mmap_threshold_kib``).

On CPU, tensors are allocated with malloc. glibc serves a request above its *mmap threshold*
with fresh pages that go back to the system when freed; smaller ones come from the heap, which
keeps freed memory for reuse. The threshold starts at 128 KiB and rises to the size of every
mmap'd block that is freed, so after the first training step nearly every tensor comes from
the heap, and the heap keeps the step's peak: peak RSS carries hundreds of MiB of freed memory
(docs/performance.md). A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, what the
``MALLOC_MMAP_THRESHOLD_`` environment variable sets at start-up) stops the rise: large
tensors are mapped and unmapped every time, which costs page faults, and RSS follows the live
tensors. Measured at d_model 1024 (docs/performance.md): 256 KiB takes ``--memory lean``'s
peak RSS from 0.80x to 0.54x bf16's and its step time from 2.8 to 4.7 s, so it is an option,
not part of the profile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def set_mmap_threshold(kib: int) -> str | None:
    """Fix glibc's mmap threshold at ``kib`` KiB for this process (0: leave glibc's dynamic
    default). Returns None when set, else why not (not Linux, not glibc, refused)."""
    if kib <= 0:
        return None
    if not sys.platform.startswith("linux"):
        return f"run.mmap_threshold_kib = {kib}: only on Linux with glibc; ignored"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return f"run.mmap_threshold_kib = {kib}: no glibc mallopt here; ignored"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, kib * 1024) != 1:
        return f"run.mmap_threshold_kib = {kib}: glibc refused it (at most 32 MiB); ignored"
    return None
