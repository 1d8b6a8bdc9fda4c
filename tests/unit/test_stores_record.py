"""``fedrec stores start`` over a record of stores that still run, in whole or in part: one line
that says what runs and what to do, and nothing started beside them."""

from __future__ import annotations

import json
import os

import pytest

from fedrec.stores import STATE_FILE, StoresError, start_stores
from tests.e2e.stores import write_stores_record
from tests.health_server import health_server


@pytest.fixture
def answering():
    """A loopback server whose /health answers 200, as a live Prefect or MLflow server's does."""
    with health_server() as url:
        yield url


def _record(folder, prefect: str, mlflow: str) -> None:
    """The record of stores whose postmaster is this process (it runs) and whose servers are
    ``prefect`` and ``mlflow``."""
    write_stores_record(folder, prefect=prefect, mlflow=mlflow,
                        pids={"postgres": os.getpid(), "prefect": 1, "mlflow": 1})  # fmt: skip


def test_stores_that_run_are_not_started_twice(tmp_path, answering):
    _record(tmp_path / "s", prefect=answering, mlflow=answering)
    with pytest.raises(StoresError, match=r"^stores already run in .*: stop them first"):
        start_stores(tmp_path / "s")


def test_stores_of_which_one_died_say_which_and_how_to_restart_it(tmp_path, answering):
    """The Prefect server of running stores had died: the start said the stores run, and nothing
    told the operator that a stop and a start bring it back."""
    dead = "http://127.0.0.1:9"  # the discard port: nothing answers there
    _record(tmp_path / "s", prefect=dead, mlflow=answering)
    with pytest.raises(StoresError) as refused:
        start_stores(tmp_path / "s")
    message = str(refused.value)
    assert message.startswith(f"stores in {tmp_path / 's'} run in part (prefect down; the others")
    assert f"`fedrec stores stop --dir {tmp_path / 's'}` stops the rest, then start them" in message
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [STATE_FILE]  # nothing started


def test_a_record_of_stores_that_all_stopped_is_started_over(tmp_path):
    """Every process of the record gone (the machine restarted): a start goes ahead on the same
    folder, here as far as the ports it is given."""
    from tests.e2e.stores import require_postgres

    require_postgres()
    folder = tmp_path / "s"
    folder.mkdir()
    record = {"prefect_api": "http://127.0.0.1:9/api", "mlflow": "http://127.0.0.1:9",
              "passfile": str(folder / "pgpass"), "postgres_url": "postgresql://fedrec@127.0.0.1:1",
              "folder": str(folder), "pids": {"postgres": 1, "prefect": 1, "mlflow": 1},
              "process_starts": {"postgres": 1}}  # fmt: skip
    (folder / STATE_FILE).write_text(json.dumps(record))
    with pytest.raises(StoresError, match=r"^port base 1023: must be in 1024-65533"):
        start_stores(folder, port_base=1023)
