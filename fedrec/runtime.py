"""Process-level settings for long numeric runs, applied by entry points (never at import)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning it to the OS.

    Training allocates and frees arrays of tens of MB every round. By default glibc serves each of
    them with a fresh ``mmap`` whose page faults cost more than the arithmetic (measured in
    ``benchmarks/round_speed.py``). The price: the process keeps its peak heap until it exits.
    Returns False where this is not glibc (nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
