"""`fedrec serve` runs the schedule: against a real Prefect server started here, with a cron of
every minute, the serving process picks up a run the scheduler created and trains it, and the
model lands in MLflow under that flow run. Every process started here is stopped by its id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedrec.local_server import free_port
from tests.e2e.test_deployment import _http, _stop

DEPLOYMENT = "federated-training/nightly-serve"  # its own name, not the worker deployment's

REPO = Path(__file__).resolve().parents[2]
PARAMS = {"synthetic_users": 300, "synthetic_items": 150, "synthetic_interactions": 6000,
          "clients": 2, "rounds": 1, "factors": 2, "warm_start": False}  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _wait_healthy(api: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if _http("GET", f"{api}/health")[0] == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError("prefect server did not become healthy in 120 s")


def _environment(tmp_path: Path, api: str) -> dict[str, str]:
    return os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "FEDREC_HOME": str(tmp_path / "fedrec"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


def _start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _kill_server(proc: subprocess.Popen) -> None:
    """The Prefect server gone at once (SIGKILL to its group). A graceful stop can take seconds,
    and after three failed polls Prefect's runner ends serving by itself: a SIGTERM sent then
    lands on a process already exiting, so it would not test what serving does with one."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _start_serving(
    env: dict[str, str], params: dict, log: Path, *flags: str, mode: str = "w"
) -> subprocess.Popen:
    """``fedrec serve`` with ``params`` as its --param flags, in a process group of its own."""
    given = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    with open(log, mode) as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "fedrec"), "serve", *flags, *given],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def test_serve_runs_a_scheduled_run_and_registers_its_model(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _environment(tmp_path, api)
    uri = env["MLFLOW_TRACKING_URI"]
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "serve")}
    started: list[subprocess.Popen] = []
    try:
        started.append(_start_server(port, env, logs["server"]))
        _wait_healthy(api, started[0], logs["server"])
        started.append(_start_serving(env, PARAMS, logs["serve"], "--cron", "* * * * *"))

        # the first scheduled run starts at the next minute; it then trains for some seconds
        deadline, done = time.time() + 300, None
        while done is None and time.time() < deadline:
            assert started[1].poll() is None, logs["serve"].read_text()[-3000:]
            status, deployment = _http("GET", f"{api}/deployments/name/{DEPLOYMENT}")
            if status == 200:
                query = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]},
                                       "state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}}  # fmt: skip
                status, runs = _http("POST", f"{api}/flow_runs/filter", query)
                assert status == 200, runs
                done = next((r for r in runs if r.get("auto_scheduled")), None)
            time.sleep(2)
        assert done is not None, (
            "no scheduled run finished in 300 s:\n" + logs["serve"].read_text()[-3000:]
        )
        # a misspelt parameter is refused at creation, as the worker deployment's is
        misspelt = _http("POST", f"{api}/deployments/{deployment['id']}/create_flow_run",
                         {"parameters": {"roundz": 5}})  # fmt: skip
        typed = _http("POST", f"{api}/deployments/{deployment['id']}/create_flow_run",
                      {"parameters": {"rounds": "5"}})  # fmt: skip
        # Ctrl-C with the server up: the schedule is paused and serving ends
        os.killpg(started[1].pid, signal.SIGINT)
        interrupted = started[1].wait(timeout=120)
        paused = _http("GET", f"{api}/deployments/name/{DEPLOYMENT}")[1]["paused"]
        # SIGTERM after the server went away ends serving at once: Prefect's shutdown retried
        # pausing the schedule through the gone server for minutes (Ctrl-C the same)
        started.append(_start_serving(env, PARAMS, logs["serve"], mode="a"))
        deadline = time.time() + 120
        while _http("GET", f"{api}/deployments/name/{DEPLOYMENT}")[1]["paused"]:
            assert started[2].poll() is None and time.time() < deadline, logs["serve"].read_text()
            time.sleep(1)
        _kill_server(started[0])
        os.killpg(started[2].pid, signal.SIGTERM)
        stopped = time.monotonic()
        exit_status = started[2].wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        for proc in reversed(started):
            _stop(proc)

    assert interrupted == 0 and paused, (interrupted, paused)
    assert "stopped serving 'federated-training/nightly-serve'; its schedule is paused" in (
        logs["serve"].read_text()
    )
    # the trigger it offers names the server it serves on (Prefect alone would start another)
    trigger = f"trigger one with: PREFECT_API_URL={api} prefect deployment run '{DEPLOYMENT}'"
    assert trigger in logs["serve"].read_text()
    assert exit_status == 1 and took < 15, (exit_status, took)
    assert (
        f"fedrec: error: the Prefect server at {api} no longer answers: stopped without pausing"
    ) in logs["serve"].read_text()
    assert misspelt[0] == 409 and "'roundz' was unexpected" in str(misspelt[1]), misspelt
    assert typed[0] == 409, typed
    assert done["state"]["type"] == "COMPLETED", done["state"]
    assert done["parameters"]["rounds"] == 1 and done["parameters"]["synthetic_users"] == 300
    assert deployment["schedules"][0]["schedule"]["cron"] == "* * * * *"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("fedrec-mf", "champion")
    assert client.get_run(version.run_id).data.tags["prefect.flow_run_id"] == done["id"]


@pytest.mark.parametrize("signalled", [True, False], ids=["sigterm", "unsignalled"])
def test_serve_after_its_server_went_away_ends_the_flow_run_it_was_training(tmp_path, signalled):
    """`kill PID` (or systemd's KillMode=mixed) signals the serving process alone. Its flow run
    in progress is a subprocess; with the server gone, serving exits at once, and the run must
    not train on without it. Unsignalled, Prefect's runner gives up after three failed polls of
    the gone server, and serving ends the same way, without retrying to pause the schedule
    there. Prefect's client retries of each call (five by default, 2 to 32 s apart: minutes)
    are cut to one then, so that the polls fail within seconds; one is kept, since a server
    busy writing its SQLite store answers 503 to a call now and then (serving's first call,
    which applies the deployment, among them)."""
    from fedrec.local_server import descendants, is_running

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _environment(tmp_path, api) | ({} if signalled else {"PREFECT_CLIENT_MAX_RETRIES": "1"})
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "serve")}
    started: list[subprocess.Popen] = []
    long_run = PARAMS | {"rounds": 6000}  # minutes of rounds: still training when stopped
    try:
        started.append(_start_server(port, env, logs["server"]))
        _wait_healthy(api, started[0], logs["server"])
        serving = _start_serving(env, long_run, logs["serve"])
        started.append(serving)
        deadline, run = time.time() + 180, None
        while time.time() < deadline:  # the deployment is there once serving started
            assert serving.poll() is None, logs["serve"].read_text()[-3000:]
            status, deployment = _http("GET", f"{api}/deployments/name/{DEPLOYMENT}")
            if status == 200 and not deployment["paused"]:
                run = _http("POST", f"{api}/deployments/{deployment['id']}/create_flow_run", {})[1]
                break
            time.sleep(1)
        assert run is not None, logs["serve"].read_text()[-3000:]
        while time.time() < deadline:
            state = _http("GET", f"{api}/flow_runs/{run['id']}")[1]["state"]["type"]
            if state == "RUNNING":
                break
            assert state in ("SCHEDULED", "PENDING"), state
            time.sleep(1)
        time.sleep(5)  # into its rounds
        training = descendants(serving.pid)
        assert training, "the flow run is not a process of fedrec serve's"

        _kill_server(started[0])
        if signalled:
            serving.send_signal(signal.SIGTERM)  # this process only, not its group
        exit_status = serving.wait(timeout=120)
        deadline = time.time() + 15
        while time.time() < deadline and any(is_running(pid) for pid in training):
            time.sleep(0.5)
        left = [pid for pid in training if is_running(pid)]
    finally:
        for proc in reversed(started):
            _stop(proc)  # the whole group: a process left behind by serving too

    text = logs["serve"].read_text()
    assert exit_status == 1, text[-3000:]
    assert left == [], (left, text[-3000:])
    assert "no longer answers: stopped without pausing" in text
    assert "ended the flow run in progress (process " in text
    assert "Pausing all deployments" not in text, text[-3000:]
    assert "fedrec: error: ConnectError" not in text, text[-3000:]  # the client's line
