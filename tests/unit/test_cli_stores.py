"""`fedrec stores status|stop|start` in process over a record of stores: what each prints, its
exit status, and the flags' bounds. The servers are a loopback /health server and `sleep`
processes; a real cluster's life is in test_stores_parts.py."""

from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner

from fedrec.cli import main
from fedrec.stores import STATE_FILE
from tests.e2e.stores import write_stores_record
from tests.health_server import health_server

DEAD = "http://127.0.0.1:9"  # the discard port: nothing answers there


def _stores(*args: str):
    return CliRunner().invoke(main, ["stores", *args])


def test_status_without_a_record_says_so_and_fails(tmp_path):
    done = _stores("status", "--dir", str(tmp_path))
    assert (done.exit_code, done.output) == (1, f"no stores are recorded in {tmp_path}\n")


def test_status_lists_each_service_and_succeeds_only_when_all_answer(tmp_path):
    me = os.getpid()  # the "postmaster": a process that runs
    with health_server() as up:
        write_stores_record(
            tmp_path, prefect=up, mlflow=up, pids={"postgres": me, "prefect": 2, "mlflow": 3}
        )
        done = _stores("status", "--dir", str(tmp_path))
        assert done.exit_code == 0, done.output
        assert done.output.splitlines() == [
            f"postgres  up    pid {me}  postgresql://fedrec@127.0.0.1:1",
            f"prefect   up    pid 2  {up}/api",
            f"mlflow    up    pid 3  {up}",
        ]
        write_stores_record(
            tmp_path, prefect=DEAD, mlflow=up, pids={"postgres": me, "prefect": 2, "mlflow": 3}
        )
        done = _stores("status", "--dir", str(tmp_path))
    assert done.exit_code == 1
    assert done.output.splitlines()[1] == f"prefect   DOWN  pid 2  {DEAD}/api"


def test_stop_without_a_record_says_so_and_succeeds(tmp_path):
    done = _stores("stop", "--dir", str(tmp_path))
    assert (done.exit_code, done.output) == (0, f"no stores are recorded in {tmp_path}\n")


def test_stop_ends_the_recorded_servers_and_removes_the_record(tmp_path):
    from tests.e2e.stores import require_postgres

    require_postgres()  # stop_stores looks for PostgreSQL's programs first
    servers = [
        subprocess.Popen(["sleep", "120"], start_new_session=True) for _ in ("prefect", "mlflow")
    ]
    try:
        # no postmaster recorded (nor a postmaster.pid): nothing of PostgreSQL's is signalled
        pids = {"prefect": servers[0].pid, "mlflow": servers[1].pid}
        write_stores_record(tmp_path, prefect=DEAD, mlflow=DEAD, pids=pids)
        done = _stores("stop", "--dir", str(tmp_path))
        assert done.exit_code == 0, done.output
        assert done.output == (
            f"stopped the stores in {tmp_path.resolve()} "
            f"(prefect {servers[0].pid}, mlflow {servers[1].pid})\n"
        )
        assert [s.wait(timeout=30) for s in servers] == [-15, -15]  # SIGTERM
        assert not (tmp_path / STATE_FILE).exists()
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=30)


@pytest.mark.parametrize(
    ("flags", "accepted"),
    [
        (["--port-base", "1023"], False),
        (["--port-base", "1024"], True),
        (["--port-base", "65533"], True),
        (["--port-base", "65534"], False),
        (["--timeout", "0.5"], False),
        (["--timeout", "1"], True),
    ],
)
def test_start_bounds_its_ports_and_timeout_and_refuses_stores_that_run(tmp_path, flags, accepted):
    """Within the bounds, the start reaches the record of stores that run and refuses in one
    line; outside them, a usage error names the flag."""
    with health_server() as up:
        write_stores_record(tmp_path, prefect=up, mlflow=up, pids={"postgres": os.getpid()})
        done = _stores("start", "--dir", str(tmp_path), *flags)
    assert done.exit_code == 2
    if accepted:
        assert done.output.startswith(f"fedrec: error: stores already run in {tmp_path}"), (
            done.output
        )
        assert done.output.count("\n") == 1
    else:
        assert f"Invalid value for '{flags[0]}'" in done.output, done.output


def test_start_help_gives_the_default_wait():
    done = _stores("start", "--help")
    assert done.exit_code == 0
    assert "seconds to wait for each service to answer [default: 180.0; x>=1]" in " ".join(
        done.output.split()
    ), done.output
