"""fedrec's local Prefect server: `fedrec server start|status|stop` on a free loopback port with a
temporary FEDREC_HOME, checked from outside (the PID's process, the port, /api/health), and the
stop path's escalation to SIGKILL on a process that ignores SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedrec import local_server

CLI = [sys.executable, "-m", "fedrec.cli"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return env | {"FEDREC_HOME": str(home), "PREFECT_HOME": str(home / "prefect")} | extra


def _fedrec(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _gone(pid: int) -> bool:
    """No such process, or only its zombie entry is left (it has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
            return r.status
    except OSError:
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, no listener
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_server_writes_task_runs_in_batches_and_a_value_set_by_the_user_wins(
    tmp_path, monkeypatch
):
    from prefect.settings.models.root import Settings

    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "7")
    env = local_server._server_env(tmp_path)

    for name, value in env.items():  # Prefect reads them under these names
        if name.startswith("PREFECT_"):
            monkeypatch.setenv(name, value)
    recorder = Settings().server.services.task_run_recorder
    assert (recorder.batch_size, recorder.flush_interval) == (7, 1.0)  # Prefect's: (1, 5.0)
    assert recorder.enabled and Settings().server.services.event_persister.enabled
    assert "PREFECT_API_URL" not in env
    # nightly runs do not pile up for ever: ended flow runs are vacuumed after the retention
    vacuum = Settings().server.services.db_vacuum
    assert "flow_runs" in vacuum.enabled_vacuum_types and vacuum.retention_period.days == 90


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_start_status_stop_lifecycle(tmp_path):
    port = local_server.free_port()
    env = _env(tmp_path, FEDREC_PREFECT_PORT=str(port))
    pid_file = tmp_path / "server" / local_server.PID_FILE
    try:
        started = _fedrec("server", "start", "--timeout", "600", env=env, timeout=700)
        assert started.returncode == 0, started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout
        assert "ready in" in started.stderr
        pid = int(pid_file.read_text())
        assert not _gone(pid) and _health(port) == 200
        assert (tmp_path / "prefect").is_dir()  # the server's database lives under FEDREC_HOME
        assert (tmp_path / "server" / local_server.LOG_FILE).stat().st_size > 0

        status = _fedrec("server", "status", env=env)
        again = _fedrec("server", "start", env=env)

        assert status.returncode == 0, status.stdout + status.stderr
        assert f"pid:     {pid}" in status.stdout and "healthy" in status.stdout
        api = f"http://127.0.0.1:{port}/api"
        named = _fedrec("server", "status", env=env | {"PREFECT_API_URL": api})
        assert named.returncode == 0 and f"api:     {api}  (PREFECT_API_URL" in named.stdout
        assert "also:" not in named.stdout  # the API named is the local server's own
        dead = f"http://127.0.0.1:{local_server.free_port()}/api"
        elsewhere = _fedrec("server", "status", env=env | {"PREFECT_API_URL": dead})
        assert elsewhere.returncode == 1 and "health:  not answering" in elsewhere.stdout
        assert f"fedrec's local server at {api} (pid {pid}), unused" in elsewhere.stdout
        assert again.returncode == 0 and "already running" in again.stdout
        assert int(pid_file.read_text()) == pid  # reused, not a second server
        other = local_server.free_port()
        moved = _fedrec("server", "start", "--port", str(other), env=env)
        assert moved.returncode == 2 and moved.stderr.count("\n") == 1, moved.stderr
        assert f"--port {other}: the local Prefect server is already running" in moved.stderr
        assert int(pid_file.read_text()) == pid and _port_free(other)
        by_env = _fedrec("server", "start", env=env | {"FEDREC_PREFECT_PORT": str(other)})
        assert by_env.returncode == 2, by_env.stdout + by_env.stderr
        assert f"FEDREC_PREFECT_PORT={other}: the local Prefect server is already" in by_env.stderr

        stopped = _fedrec("server", "stop", env=env)

        assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout, stopped.stderr
        assert _gone(pid)
        assert not pid_file.exists()
        assert _health(port) is None and _port_free(port)
        after = _fedrec("server", "status", env=env)
        assert after.returncode == 1 and "no local Prefect server is running" in after.stdout
    finally:
        if pid_file.exists():
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_status_reports_the_api_that_prefect_api_url_names_not_a_missing_local_server(tmp_path):
    """Commands report to PREFECT_API_URL's server when it is set: that is the one to check."""
    dead = f"http://127.0.0.1:{local_server.free_port()}/api"
    status = _fedrec("server", "status", env=_env(tmp_path) | {"PREFECT_API_URL": dead})

    assert status.returncode == 1, status.stdout + status.stderr
    assert status.stdout.splitlines()[:2] == [
        f"api:     {dead}  (PREFECT_API_URL: fedrec's commands report to it)",
        "health:  not answering",
    ]


def test_stop_without_a_server_says_so(tmp_path):
    stopped = _fedrec("server", "stop", env=_env(tmp_path))

    assert stopped.returncode == 0 and "no local Prefect server is running" in stopped.stdout


def test_a_taken_port_is_one_line_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = _fedrec("server", "start", "--port", str(port), env=_env(tmp_path))

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        f"fedrec: error: port {port} on 127.0.0.1 is in use: choose another with --port or "
        "FEDREC_PREFECT_PORT"
    )
    assert not (tmp_path / "server" / local_server.PID_FILE).exists()


def test_a_free_port_is_one_no_outgoing_connection_can_take_before_the_server_binds_it():
    """A client socket's local port comes from the kernel's outgoing range; a server asked to
    listen on such a port while a connection holds it exits with "address already in use"."""
    low, high = local_server._outgoing_ports()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            taken = client.getsockname()[1]
            assert low <= taken <= high  # where the kernel put the client
            ports = {local_server.free_port() for _ in range(40)}

    assert all(local_server.LISTEN_PORTS_FROM <= port < low for port in ports), sorted(ports)
    assert len(ports) > 30  # drawn, not one fixed port that two starters would share


def test_a_server_that_exits_during_start_up_is_reported_by_its_error_line(tmp_path):
    from fedrec.stores import _log_reason

    log = tmp_path / "mlflow.log"
    log.write_text(
        "INFO:     Application startup complete.\n"
        "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 42866): "
        "address already in use\n"
        "INFO:     Waiting for application shutdown.\n"
        "INFO:     Application shutdown complete.\n"
    )

    assert _log_reason(log).endswith("address already in use")


def test_a_stale_record_of_a_dead_server_is_cleared(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "server"
    folder.mkdir()
    (folder / local_server.STATE_FILE).write_text(
        json.dumps({"pid": dead.pid, "port": 1, "started_at": 0.0, "process_start": None})
    )
    (folder / local_server.PID_FILE).write_text(f"{dead.pid}\n")

    status = _fedrec("server", "status", env=_env(tmp_path))

    assert status.returncode == 1 and "no local Prefect server is running" in status.stdout
    assert not (folder / local_server.PID_FILE).exists()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    stubborn = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert stubborn.stdout.readline().strip() == "ready"  # the handler is installed
        folder = tmp_path / "server"
        folder.mkdir()
        record = {"pid": stubborn.pid, "port": 1, "started_at": time.time(),
                  "process_start": local_server.process_start(stubborn.pid)}  # fmt: skip
        (folder / local_server.STATE_FILE).write_text(json.dumps(record))

        started = time.monotonic()
        stopped = _fedrec("server", "stop", "--grace", "1", env=_env(tmp_path))
        stubborn.wait(timeout=10)

        assert stopped.returncode == 0, stopped.stderr
        assert stubborn.returncode == -signal.SIGKILL
        assert time.monotonic() - started >= 1  # SIGTERM was given its grace period first
    finally:
        if stubborn.poll() is None:
            stubborn.kill()


_ENDS_ITS_CHILDREN = """
import json, signal, subprocess, sys, time
from fedrec import local_server
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
stubborn = [sys.executable, "-c",
            "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print('ready', flush=True); time.sleep(600)"]
server = subprocess.Popen(sleeper, start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)  # it outlives this process
run = subprocess.Popen(stubborn, stdout=subprocess.PIPE, text=True)
assert run.stdout.readline().strip() == "ready"
grandchildren = local_server.descendants(run.pid)
folder = local_server.server_dir()
folder.mkdir(parents=True)
(folder / local_server.STATE_FILE).write_text(json.dumps({
    "pid": server.pid, "port": 1, "started_at": time.time(),
    "process_start": local_server.process_start(server.pid)}))
ended = local_server.end_descendants(grace=1.0)
run.wait(timeout=10)
print(json.dumps({"ended": ended, "run": run.pid, "status": run.returncode,
                  "grandchildren": grandchildren, "server": server.pid}), flush=True)
"""


def test_end_descendants_ends_a_processs_children_and_spares_the_local_server(tmp_path):
    """A process about to exit ends what it started (a flow run's subprocess and the processes
    that one started), SIGKILL for one that ignores SIGTERM, and leaves fedrec's local server,
    which other commands use, running. Run in a process of its own: it ends every descendant."""
    done = subprocess.run([sys.executable, "-c", _ENDS_ITS_CHILDREN], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    server = seen["server"]
    try:
        assert len(seen["grandchildren"]) == 1
        assert sorted(seen["ended"]) == sorted([seen["run"], *seen["grandchildren"]])
        assert seen["status"] == -signal.SIGKILL  # it ignored SIGTERM
        deadline = time.monotonic() + 10  # SIGKILL is delivered, not awaited
        while local_server.is_running(seen["grandchildren"][0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not local_server.is_running(seen["grandchildren"][0])
        assert local_server.is_running(server)  # the local server is spared
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
        for pid in seen["grandchildren"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _task_run_states(port: int, flow_run_id: str, minimum: int) -> list[str]:
    """The states of the flow run's task runs named after a client, once ``minimum`` are there
    (the server records task runs from events, a moment after they ran)."""
    body = json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode()
    deadline = time.monotonic() + 30
    while True:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/task_runs/filter", data=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = [r for r in json.load(response) if "client-" in r["name"]]
        if len(runs) >= minimum or time.monotonic() > deadline:
            return [r["state_type"] for r in runs]
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_train_starts_the_local_server_leaves_it_running_and_links_both_uis(tmp_path):
    from mlflow.tracking import MlflowClient

    port = local_server.free_port()
    env = {k: v for k, v in _env(tmp_path, FEDREC_PREFECT_PORT=str(port)).items()
           if k != "MLFLOW_TRACKING_URI"}  # fmt: skip
    pid_file = tmp_path / "server" / local_server.PID_FILE
    try:
        trained = _fedrec("train", "--rounds", "1", "--clients", "2", "--factors", "2",
                          env=env, timeout=1100)  # fmt: skip

        assert trained.returncode == 0, trained.stderr[-3000:]
        assert "no local Prefect server is running: starting one" in trained.stderr
        prefect_line = next(
            line for line in trained.stdout.splitlines() if line.startswith("Prefect flow run:")
        )
        flow_run_id = prefect_line.rsplit("/", 1)[1]
        assert prefect_line.split()[-1] == (f"http://127.0.0.1:{port}/runs/flow-run/{flow_run_id}")
        # the server outlives the command, and it holds the run, completed
        assert not _gone(int(pid_file.read_text())) and _health(port) == 200
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/flow_runs/{flow_run_id}", timeout=30
        ) as response:
            assert json.load(response)["state_type"] == "COMPLETED"
        # every client's task run is in the UI (the recorder writes them in batches)
        states = _task_run_states(port, flow_run_id, minimum=4)
        assert states.count("COMPLETED") == len(states) >= 4, states
        mlflow_line = next(
            line for line in trained.stdout.splitlines() if line.startswith("MLflow run:")
        )
        run_id = mlflow_line.split()[2].rsplit("/", 1)[1].split("?", 1)[0]  # without the view
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
        assert f"/#/experiments/{run.info.experiment_id}/runs/{run_id}" in mlflow_line
        assert run.info.status == "FINISHED"
    finally:
        _fedrec("server", "stop", env=env)
    assert not pid_file.exists()
