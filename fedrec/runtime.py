"""Process-level settings for long numeric runs, applied by entry points (never at import)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator

from fedrec.local_server import is_running, process_start

#: what becomes of a run of real sites that did not finish: it is trained again, not resumed
SITES_TRAINED_AGAIN = (
    "a run of real sites (--sites) is not resumed: train again with the same --sites"
)

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


# Variables through which a user sets Prefect's flow run heartbeat; when one is set, it wins.
_HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def foreground_flow() -> Iterator[None]:
    """Run the block's flow runs without Prefect's flow run heartbeat, unless the user set one.

    Prefect's flow engine sends a heartbeat every 180 s from a thread that sleeps in one-second
    steps, and joins that thread when the run ends, so every run ended up to a second late (half a
    second on average; ``benchmarks/overhead.py``'s flow times came in whole seconds plus 0.1). A
    heartbeat serves an automation that marks a silent run as crashed; a command that runs its
    flow in the foreground reports its own failure. Runs started by a worker or by ``fedrec
    serve`` run in processes of their own and keep their heartbeats.
    """
    global _foreground
    _foreground = True
    try:
        if any(os.environ.get(name) for name in _HEARTBEAT_ENV):
            yield
            return
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
    finally:
        _foreground = False


# A foreground flow run records its process as its infrastructure_pid, in this form:
# "fedrec-foreground:<host>:<pid>:<process start>" (workers record their own, in another form)
_OWNER = "fedrec-foreground"
_foreground = False
last_flow_run_id: str | None = None  # of the latest flow run recorded in this process


def record_foreground_process(flow_run_id: str | None) -> None:
    """Record this process as the owner of ``flow_run_id`` if the flow runs in a foreground
    command (inside :func:`foreground_flow`), so that a later command can tell that the run lost
    its process; :func:`crash_lost_runs` marks such runs."""
    global last_flow_run_id
    if not _foreground or flow_run_id is None:
        return
    last_flow_run_id = flow_run_id
    from prefect.client.orchestration import get_client

    owner = f"{_OWNER}:{socket.gethostname()}:{os.getpid()}:{process_start(os.getpid())}"
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run_id, infrastructure_pid=owner)
    except Exception as err:  # bookkeeping: the run goes on without it
        logging.getLogger(__name__).warning("could not record the run's process: %s", err)


def crash_lost_runs(
    flow_name: str, tracking_run_of: Callable[[str], str | None] = lambda _: None
) -> list[tuple[str, str | None]]:
    """Mark as crashed the running flow runs of ``flow_name`` whose foreground process, on this
    host, is gone (killed, or its machine restarted): without a heartbeat, the server would show
    them running forever. ``tracking_run_of(flow_run_id)`` closes the flow run's MLflow run and
    says what became of it (``fedrec train --resume ID continues it``; None: not found), which
    the crash message then gives; without it, a run of real sites (its ``sites`` parameter) is
    said to be trained again, any other to be continued by ``--resume``. Returns each lost run's
    name and that text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host, lost = socket.gethostname(), []
    with get_client(sync_client=True) as client:
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
        )
        for run in running:
            owner, _, rest = (run.infrastructure_pid or "").partition(":")
            where, _, process = rest.rpartition(":")
            run_host, _, pid = where.rpartition(":")
            if owner != _OWNER or run_host != host or not pid.isdigit() or not process.isdigit():
                continue
            if is_running(int(pid), int(process)):
                continue
            tracking_run = tracking_run_of(str(run.id))
            if tracking_run:
                resume = tracking_run
            elif (run.parameters or {}).get("sites"):  # trained again: --resume refuses it
                resume = SITES_TRAINED_AGAIN
            else:
                resume = (
                    "fedrec train --resume <MLflow run id> continues it (the id is in the run's "
                    "log and in MLflow, on the run tagged with this flow run's id)"
                )
            message = (
                f"its process ({pid} on {host}) ended without reporting, e.g. killed; {resume}"
            )
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            lost.append((run.name, tracking_run))
    return lost
