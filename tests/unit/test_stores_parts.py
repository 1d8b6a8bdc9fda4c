"""The parts of ``fedrec stores`` below its servers, each on real processes and files: the
PostgreSQL cluster's life (initdb once, a start on a port of loopback, its databases made once,
a fast stop), the ports a run takes, a process stopped by signal and SIGKILL after its grace,
the waiting for servers that answer or die, the reason a log gives, the record's round trip, and
what is stopped when a start fails. The whole set of stores under a training run is tested in
``tests/e2e/test_postgres_stores.py``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedrec import stores as st
from fedrec.local_server import is_running, process_start
from fedrec.stores import STATE_FILE, Stores, StoresError
from tests.e2e.stores import psql, require_postgres
from tests.health_server import health_server


def _stores(folder: Path, **changes) -> Stores:
    record = dict(prefect_api="http://127.0.0.1:1/api", mlflow_uri="http://127.0.0.1:2",
                  postgres_url="postgresql://fedrec@127.0.0.1:3", pids={"postgres": 4},
                  folder=str(folder), passfile=str(folder / "pgpass"),
                  process_starts={"postgres": 5})  # fmt: skip
    return Stores(**(record | changes))


def test_a_record_round_trips_and_names_each_database(tmp_path):
    stores = _stores(tmp_path)
    st._write_state(tmp_path, stores)

    written = json.loads((tmp_path / STATE_FILE).read_text())
    assert list(written)[:2] == ["prefect_api", "mlflow"]  # what a reader looks for first
    assert not (tmp_path / "stores.json.tmp").exists()
    assert st.read_stores(tmp_path) == stores
    assert stores.database_url("mlflow") == "postgresql://fedrec@127.0.0.1:3/mlflow"
    assert stores.database_url("prefect", "asyncpg") == (
        "postgresql+asyncpg://fedrec@127.0.0.1:3/prefect"
    )


def test_a_folder_without_a_record_has_no_stores_and_a_bad_record_is_one_line(tmp_path):
    assert st.read_stores(tmp_path) is None
    assert st.stop_stores(tmp_path) is None
    (tmp_path / STATE_FILE).write_text('{"prefect_api": "x"}')
    with pytest.raises(
        StoresError, match=rf"^{re.escape(str(tmp_path / STATE_FILE))}: not a stores record \("
    ):
        st.read_stores(tmp_path)


def test_a_logs_reason_is_its_last_error_line_else_its_last_line(tmp_path):
    log = tmp_path / "server.log"
    assert st._log_reason(log) == ""  # no log at all
    log.write_text("starting\nFATAL:  role does not exist\nERROR: late\nshutting down\n\n")
    assert st._log_reason(log) == "ERROR: late"
    log.write_text("starting\nFATAL:  data directory has wrong ownership\nshutting down\n")
    assert st._log_reason(log) == "FATAL:  data directory has wrong ownership"
    log.write_text("starting\nlistening\n" + "x" * 400 + "\n")
    assert st._log_reason(log) == "x" * 300


def test_the_ports_are_free_ones_or_three_from_a_base_that_are_all_free():
    assert len(set(st._ports(None))) == 3
    for base in (1023, 65534):
        with pytest.raises(StoresError, match=rf"^port base {base}: must be in 1024-65533"):
            st._ports(base)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]  # the base itself, the first port looked at
        with pytest.raises(StoresError, match=rf"^port {taken} on 127.0.0.1 is in use"):
            st._ports(taken)
    with socket.socket() as probe:  # a base whose three ports are free: those three
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    for base in (free, 1024, 65533):
        if all(st.port_is_free(base + i) for i in range(3)):
            assert st._ports(base) == (base, base + 1, base + 2)


def _child(ignore_term: bool) -> subprocess.Popen:
    handler = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_term else ""
    process = subprocess.Popen(
        [sys.executable, "-c", f"import signal, sys, time; {handler}print('up', flush=True); "
         "time.sleep(600)"],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert process.stdout.readline() == b"up\n"  # its handler is in place
    return process


def test_a_process_is_ended_by_sigterm_or_after_its_grace_by_sigkill():
    polite, stubborn = _child(False), _child(True)
    try:
        started = time.monotonic()
        st._terminate(polite.pid, process_start(polite.pid), grace=30)
        assert polite.wait(5) == -signal.SIGTERM and time.monotonic() - started < 10

        started = time.monotonic()
        st._terminate(stubborn.pid, process_start(stubborn.pid), grace=1.0)
        assert stubborn.wait(5) == -signal.SIGKILL
        assert 1.0 <= time.monotonic() - started < 10
    finally:
        for process in (polite, stubborn):
            process.kill()
            process.wait()
    st._terminate(polite.pid, process_start(polite.pid))  # gone already: nothing to do


@pytest.fixture
def answering():
    with health_server() as url:
        yield url


def test_servers_are_waited_for_until_they_answer_die_or_time_out(tmp_path, answering):
    asleep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (tmp_path / "mlflow.log").write_text("booting\nERROR: no such table\n")
    died = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    died.wait()
    try:
        up = _stores(tmp_path, prefect_api=f"{answering}/api", mlflow_uri=answering)
        st._wait_for_servers(up, {"prefect": asleep, "mlflow": asleep}, tmp_path, timeout=30)

        dead = _stores(tmp_path, prefect_api=f"{answering}/api", mlflow_uri="http://127.0.0.1:9")
        with pytest.raises(StoresError) as exited:
            st._wait_for_servers(dead, {"prefect": asleep, "mlflow": died}, tmp_path, timeout=30)
        assert str(exited.value) == (
            f"the mlflow server exited during start-up (status 3): ERROR: no such table "
            f"(log: {tmp_path / 'mlflow.log'})"
        )

        started = time.monotonic()
        with pytest.raises(StoresError, match=r"^mlflow did not answer within 1 s \(logs in "):
            st._wait_for_servers(dead, {"prefect": asleep, "mlflow": asleep}, tmp_path, timeout=1)
        assert 1 <= time.monotonic() - started < 10
    finally:
        asleep.kill()
        asleep.wait()


def test_a_servers_environment_reports_to_no_other_server(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere")
    cluster = st._Cluster.__new__(st._Cluster)
    cluster.passfile = tmp_path / "pgpass"
    env = st._server_env(tmp_path, cluster, 5555)

    assert "PREFECT_API_URL" not in env and "MLFLOW_TRACKING_URI" not in env
    assert env["PGPASSFILE"] == str(tmp_path / "pgpass")
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == (
        "postgresql+asyncpg://fedrec@127.0.0.1:5555/prefect"
    )


@pytest.fixture
def cluster_folder():
    require_postgres()
    # searchable (not readable) by others: under root the cluster runs as the postgres user
    folder = Path(tempfile.mkdtemp(prefix="fedrec-cluster-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_cluster_is_made_once_started_on_loopback_given_its_databases_and_stopped(
    cluster_folder,
):
    cluster = st._Cluster(cluster_folder, st.postgres_bindir())
    assert cluster.root == cluster_folder / "postgres" and cluster.pid() is None
    cluster.create()
    password = cluster.passfile.read_text()
    assert password.startswith("127.0.0.1:*:*:fedrec:") and len(password.split(":")[-1]) > 30
    assert (cluster.data / "PG_VERSION").is_file() and not (cluster.root / "initdb.pw").exists()
    cluster.create()  # made once: the same cluster and password
    assert cluster.passfile.read_text() == password

    port = st.free_port()
    pid = cluster.start(port, durable=False, timeout=120)
    try:
        assert pid == cluster.pid() and is_running(pid, process_start(pid))
        cluster.create_databases(port)
        cluster.create_databases(port)  # the second time finds them
        stores = _stores(cluster_folder, postgres_url=f"postgresql://fedrec@127.0.0.1:{port}",
                         passfile=str(cluster.passfile))  # fmt: skip
        assert psql(stores, "postgres", "SHOW fsync") == [["off"]]  # not durable
        databases = psql(stores, "postgres", "SELECT datname FROM pg_database ORDER BY 1")
        assert {"prefect", "mlflow"} <= {row[0] for row in databases}
        assert psql(stores, "prefect", "SHOW listen_addresses") == [["127.0.0.1"]]
    finally:
        # a start that failed before it recorded the postmaster: the cluster is stopped all
        # the same, found by its own postmaster.pid
        started = process_start(pid)
        try:
            st._stop_started(cluster_folder, cluster, {}, {})
            still, recorded = is_running(pid, started), cluster.pid()
        finally:
            if is_running(pid, started):  # whatever failed, no postmaster is left behind
                os.kill(pid, signal.SIGKILL)
    assert not still and recorded is None


def test_a_failed_start_stops_what_it_started_and_leaves_no_record(tmp_path):
    servers = [_child(False), _child(False)]
    pids = {"prefect": servers[0].pid, "mlflow": servers[1].pid}
    starts = {name: process_start(pid) for name, pid in pids.items()}
    (tmp_path / STATE_FILE).write_text("{}")
    cluster = st._Cluster.__new__(st._Cluster)
    cluster.data = tmp_path / "no-cluster"
    try:
        st._stop_started(tmp_path, cluster, pids, starts)
        assert [s.wait(5) for s in servers] == [-signal.SIGTERM, -signal.SIGTERM]
        assert not (tmp_path / STATE_FILE).exists()
    finally:
        for process in servers:
            process.kill()
            process.wait()


def test_a_wrong_cluster_command_fails_with_its_last_line():
    with pytest.raises(StoresError, match=r"^initdb failed: boom$"):
        st._run([sys.executable, "-c", "import sys; print('a\\nb\\n\\nboom', file=sys.stderr); "
                 "sys.exit(1)"], "initdb")  # fmt: skip
    with pytest.raises(StoresError, match=r"^psql failed: status 4$"):
        st._run([sys.executable, "-c", "raise SystemExit(4)"], "psql")
    assert st._run([sys.executable, "-c", "print('ok')"], "psql") == "ok\n"
    assert os.geteuid() != 0 or st._as_postgres()[-3:] == ["-u", "postgres", "--"]
    assert os.geteuid() == 0 or st._as_postgres() == []


def test_postgresql_is_found_where_both_initdb_and_pg_ctl_are(tmp_path, monkeypatch):
    """``pg_config --bindir`` naming a folder without pg_ctl (a client-only install) is passed
    over for Debian's server folder."""
    require_postgres()
    client_only = tmp_path / "client" / "bin"
    client_only.mkdir(parents=True)
    (client_only / "initdb").write_text("")
    tools = tmp_path / "tools"
    tools.mkdir()
    pg_config = tools / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {client_only}\n")
    pg_config.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")

    found = st.postgres_bindir()
    assert found != client_only and (found / "pg_ctl").is_file()
    (client_only / "pg_ctl").write_text("")
    assert st.postgres_bindir() == client_only  # pg_config's folder first when it has both


def test_the_newest_postgresql_of_several_is_taken(tmp_path, monkeypatch):
    found = []
    for version in ("9", "15", "13", "extra"):
        folder = tmp_path / "lib" / "postgresql" / version / "bin"
        folder.mkdir(parents=True)
        for tool in ("initdb", "pg_ctl"):
            (folder / tool).write_text("")
        found.append(str(folder / "initdb"))
    monkeypatch.setattr(st.shutil, "which", lambda name: None)  # no pg_config
    monkeypatch.setattr(st.glob, "glob", lambda pattern: list(found))

    assert st.postgres_bindir() == tmp_path / "lib" / "postgresql" / "15" / "bin"
