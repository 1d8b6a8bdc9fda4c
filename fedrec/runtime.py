"""Process-level settings for long numeric runs, applied by entry points (never at import)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

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


# Variables through which a user chooses the BLAS / OpenMP thread count; when one is set, it wins.
_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with BLAS limited to one thread per calling thread (the process's BLAS
    libraries as loaded; restored on exit), unless one of ``OPENBLAS_NUM_THREADS``,
    ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` is set.

    The training flow runs client tasks in parallel threads. Without a limit every numpy call in
    each of them starts one BLAS thread per core, and OpenBLAS's threads wait for work by
    spinning: on 2 cores shared with the Prefect server, a 20-round ML-100K loop used 17 CPU
    seconds with 2 BLAS threads and 4.3 with one (``benchmarks/overhead.py``). The tasks'
    parallelism takes the place of BLAS's.
    """
    if any(os.environ.get(name) for name in _THREAD_ENV):
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
