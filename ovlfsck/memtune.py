"""Process-wide malloc setting for a run over a large layer set (issue 5: peak RSS).

glibc's malloc serves allocations of 128 KiB and more with mmap, and gives them back to
the system when freed, but after such a block is freed it raises that threshold to the
block's size (up to 32 MiB): from then on the large tables of a wide directory (its
listings' dicts, its chains' dict) come from the heap, and their memory stays with the
process after the directory's visit, beside the pymalloc arenas the next visits fill.
Setting the threshold explicitly turns that adjustment off (mallopt(3)): a wide
directory's tables go back when it is done. At 1M entries this took the peak RSS of
`check -n` from ~38.1 to ~36.9 MiB (docs/performance.md).

Only glibc has M_MMAP_THRESHOLD; elsewhere (musl, no libc found) nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # malloc.h
THRESHOLD = 128 << 10  # glibc's default, kept fixed


def tune() -> bool:
    """Fix glibc's mmap threshold; True if it was set. OVLFSCK_MALLOC_TUNE=0 skips it."""
    if os.environ.get("OVLFSCK_MALLOC_TUNE") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl's mallopt ignores this parameter
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
