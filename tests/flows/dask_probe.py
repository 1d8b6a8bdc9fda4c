"""A Dask worker preload for tests: every task a worker finishes is written, with the worker's
process id, to a file under ``$FEDREC_TEST_DASK_PROBE`` (one file per process). Tests read the
files to show that tasks ran in worker processes, not in threads of the flow's own process.

Load it with ``dask worker --preload tests.flows.dask_probe`` or the Dask setting
``distributed.worker.preload``.
"""

from __future__ import annotations

import os
from pathlib import Path

from distributed import WorkerPlugin

PROBE_DIR = "FEDREC_TEST_DASK_PROBE"


class _FinishedTasks(WorkerPlugin):
    def __init__(self, folder: Path) -> None:
        self.file = folder / f"{os.getpid()}.log"

    def transition(self, key, start, finish, **kwargs) -> None:
        if start == "executing" and finish == "memory":
            with open(self.file, "a") as out:
                out.write(f"{key}\n")


async def dask_setup(worker) -> None:
    folder = os.environ.get(PROBE_DIR)
    if folder:
        await worker.plugin_add(_FinishedTasks(Path(folder)), name="fedrec-test-probe")


def finished_tasks(folder: Path) -> dict[int, list[str]]:
    """Process id -> keys of the tasks it finished, from the probe's files in ``folder``."""
    return {int(f.stem): f.read_text().split() for f in sorted(folder.glob("*.log"))}
