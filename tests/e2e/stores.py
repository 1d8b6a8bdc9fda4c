"""Real production stores for end-to-end tests: PostgreSQL, a Prefect server and an MLflow server
(artifact proxy) started by :func:`fedrec.stores.start_stores` in a temporary folder.

Use the fixture by importing it into a test module (``from tests.e2e.stores import
postgres_stores``); it is module-scoped, so the module's tests share one set of servers. Without
PostgreSQL the tests skip with the reason, except in CI (``CI=true``), where they fail: CI's
set-up (``.ci/run``) installs Debian's ``postgresql``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedrec.local_server import process_start
from fedrec.stores import (
    STATE_FILE,
    Stores,
    StoresError,
    postgres_bindir,
    start_stores,
    stop_stores,
)

# A cold start migrates both databases: ~12 s on a quiet 2-core machine, minutes under load.
START_TIMEOUT = 300.0


def write_stores_record(folder: Path, *, prefect: str, mlflow: str, pids: dict[str, int]) -> None:
    """A ``stores.json`` in ``folder`` naming servers at ``prefect`` (its API under ``/api``) and
    ``mlflow``, with the given process ids (each with its start time, None when it is gone)."""
    folder.mkdir(exist_ok=True)
    record = {"prefect_api": f"{prefect}/api", "mlflow": mlflow, "passfile": str(folder / "pgpass"),
              "postgres_url": "postgresql://fedrec@127.0.0.1:1", "folder": str(folder),
              "pids": pids, "process_starts": {n: process_start(p) for n, p in pids.items()}}  # fmt: skip
    (folder / STATE_FILE).write_text(json.dumps(record))


def require_postgres() -> Path:
    """PostgreSQL's bin folder; skips the test without it, or fails it in CI."""
    try:
        return postgres_bindir()
    except StoresError as err:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{err} (CI must provide it: .ci/run installs it)")
        pytest.skip(str(err))


def process_tree(root: int) -> set[int]:
    """``root`` and every process descended from it (from /proc's parent ids)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def live(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (zombies count as gone)."""
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X"):
                alive.add(pid)
    return alive


def psql(stores: Stores, database: str, query: str) -> list[list[str]]:
    """Rows of a query run with PostgreSQL's own client (fields split on '|')."""
    out = subprocess.run(
        [str(postgres_bindir() / "psql"), stores.database_url(database), "-v", "ON_ERROR_STOP=1",
         "-tA", "-c", query],
        env=os.environ | {"PGPASSFILE": stores.passfile}, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    return [line.split("|") for line in out.stdout.splitlines() if line]


@contextlib.contextmanager
def running_stores() -> Iterator[Stores]:
    """Stores in a fresh temporary folder, stopped and removed afterwards."""
    require_postgres()
    # Searchable (not readable) by others: under root the cluster runs as the postgres user
    folder = Path(tempfile.mkdtemp(prefix="fedrec-stores-"))
    folder.chmod(0o711)
    try:
        yield start_stores(folder, timeout=START_TIMEOUT, durable=False)
    finally:
        try:
            stop_stores(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_stores() -> Iterator[Stores]:
    """PostgreSQL + Prefect server + MLflow server for the tests of one module."""
    with running_stores() as stores:
        yield stores
