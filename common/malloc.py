"""Freed memory kept for reuse, so that each request's large buffers come back without page faults.

Why: glibc's malloc serves a block over its mmap threshold (128 KiB, rising to the largest such
block freed so far) with fresh pages from the kernel, and hands the top of its heap back to the
kernel once more than its trim threshold (twice the mmap threshold) lies free there. A request with
a text- and photo-dense 1080p screenshot (a 778 KB body, the screenshot's 583 KB, the data URL's
text: ~3 MB of buffers freed together at its end) then cost the frontend ~750 minor page faults
every time, each a trap and a zeroed page: on this project's 2-core CI box the time outside the
worker over HTTP was 7.5-8.9 ms with them and 5.7-6.5 without (bench/RESULTS.md, twenty-ninth
session). Fixed thresholds keep blocks below MMAP_THRESHOLD in the heap and up to TRIM_THRESHOLD of
its free top mapped, so a process keeps about its peak working set.

glibc only; elsewhere (macOS, musl) nothing changes.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1            # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20        # a 4K screenshot's request body is ~10 MB
TRIM_THRESHOLD = 64 << 20


def keep_freed_memory() -> bool:
    """Fix this process's malloc thresholds (above); True where glibc took them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version          # glibc's own; musl's mallopt ignores these settings
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
