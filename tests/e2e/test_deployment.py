"""End to end against a real Prefect server and process worker: deploy deployments/prefect.yaml,
trigger runs over HTTP, with the Prefect CLI and with run_deployment, and check what lands in
MLflow. Every process the test starts is stopped at the end, also when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedrec.local_server import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = "federated-training/nightly"
HEARTBEAT = 30  # seconds between a flow run's heartbeats
SMALL = {
    "synthetic_users": 300,
    "synthetic_items": 200,
    "synthetic_interactions": 9_000,
    "clients": 3,
    "rounds": 2,
    "factors": 4,
}

# Starting the server, deploying and waiting for runs takes minutes on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict | list]:
    """A raw HTTP call; retries the 503s a busy SQLite-backed server may answer."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(10):
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            if err.code == 503 and attempt < 9:
                time.sleep(1)
                continue
            return err.code, json.loads(err.read() or b"null")
    raise AssertionError("unreachable")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGINT, then SIGKILL, to the whole process group."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGINT, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # Prefect's shortest heartbeat period: a silent run is found in three of them
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT),
        "FEDREC_HOME": str(home / "fedrec"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    prefect = [sys.executable, "-m", "prefect"]
    started: list[subprocess.Popen] = []
    logs = home / "logs"
    logs.mkdir()
    files = contextlib.ExitStack()
    try:
        server = subprocess.Popen(
            [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=files.enter_context(open(logs / "server.log", "w")),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(server)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if _http("GET", f"{api}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError("prefect server did not become healthy in 120 s")
        for command in (
            # as make deploy does: the file's parameters and data, and that the server answers
            [sys.executable, "-m", "fedrec.deployment_check", "deployments/prefect.yaml", "--api"],
            [*prefect, "work-pool", "create", "fedrec-local", "--type", "process", "--overwrite"],
            [
                *prefect,
                "--no-prompt",
                "deploy",
                "--prefect-file",
                "deployments/prefect.yaml",
                "--all",
            ],
            [sys.executable, "-m", "fedrec.lock_parameters"],  # as make deploy does
            # as make deploy does, with a window for this stack's short heartbeats
            [sys.executable, "-m", "fedrec.silent_runs", "--within", str(3 * HEARTBEAT)],
        ):
            done = subprocess.run(
                command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180
            )
            assert done.returncode == 0, done.stdout + done.stderr

        # a worker started without MLFLOW_TRACKING_URI, its own FEDREC_HOME: its runs report to
        # the store the deployment pins, the one in force where it was deployed
        worker_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
        worker_env["FEDREC_HOME"] = str(home / "worker-home")

        def start_worker() -> subprocess.Popen:
            worker = subprocess.Popen(
                [*prefect, "worker", "start", "--pool", "fedrec-local"],
                env=worker_env,
                cwd=home,
                stdout=files.enter_context(open(logs / "worker.log", "a")),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            started.append(worker)
            return worker

        start_worker()
        status, deployment = _http("GET", f"{api}/deployments/name/{DEPLOYMENT}")
        assert status == 200, deployment
        yield {
            "api": api,
            "env": env,
            "deployment": deployment,
            "logs": logs,
            # the registry too: a flow run in this process may have set MLflow's global one
            "mlflow": MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"]),
            "workers": started[1:],  # the worker running now is the last
            "start_worker": start_worker,
            "worker_home": Path(worker_env["FEDREC_HOME"]),
        }
    finally:
        for proc in reversed(started):
            _stop(proc)
        files.close()


def _create_run(stack, parameters: dict) -> tuple[int, dict]:
    return _http(
        "POST",
        f"{stack['api']}/deployments/{stack['deployment']['id']}/create_flow_run",
        {"parameters": parameters},
    )


def _wait(stack, run_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, run = _http("GET", f"{stack['api']}/flow_runs/{run_id}")
        assert status == 200, run
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    worker_log = (stack["logs"] / "worker.log").read_text()[-4000:]
    raise AssertionError(
        f"flow run {run_id} did not finish in {timeout} s; worker log:\n{worker_log}"
    )


def _flow_runs(stack) -> set[str]:
    """Ids of the deployment's flow runs created on request (the scheduler's own are left out:
    it adds them whenever its loop runs)."""
    query = {"flow_runs": {"deployment_id": {"any_": [stack["deployment"]["id"]]}}, "limit": 200}
    status, runs = _http("POST", f"{stack['api']}/flow_runs/filter", query)
    assert status == 200, runs
    return {r["id"] for r in runs if not r.get("auto_scheduled")}


def _versions(stack) -> int:
    return len(stack["mlflow"].search_model_versions("name='fedrec-mf'"))


def test_deployment_has_the_schedule_limit_and_defaults(stack):
    deployment = stack["deployment"]
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert (
        deployment["concurrency_limit"] == 1 or deployment["global_concurrency_limit"]["limit"] == 1
    )
    assert deployment["work_pool_name"] == "fedrec-local"
    # the Prefect UI's run form says what each parameter is, and offers no simulation
    properties = deployment["parameter_openapi_schema"]["properties"]
    assert properties["rounds"]["description"].startswith("federated rounds (default: 10")
    assert all(spec.get("description") for spec in properties.values())
    assert not {"attack", "fault_probability"} & set(properties)
    # the data is the configuration's default: a run given split files lists no other source
    assert deployment["parameters"] == {"warm_start": True}
    # the store in force at deployment, pinned for whatever worker runs it
    pinned = deployment["job_variables"]["env"]["MLFLOW_TRACKING_URI"]
    assert pinned == stack["env"]["MLFLOW_TRACKING_URI"]


def test_deploying_makes_silent_training_runs_crash(stack):
    """``make deploy`` creates the automation that marks a training run Crashed after its window
    without a heartbeat or a final state: 30 minutes unless told (run again: still one)."""
    done = subprocess.run([sys.executable, "-m", "fedrec.silent_runs"], env=stack["env"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    status, found = _http("POST", f"{stack['api']}/automations/filter", {})
    assert status == 200, found
    (automation,) = [a for a in found if a["name"] == "fedrec: crash silent training runs"]
    trigger = automation["trigger"]
    assert trigger["posture"] == "Proactive" and trigger["within"] == 1800
    assert trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert "prefect.flow-run.Completed" in trigger["expect"]
    assert trigger["match_related"]["prefect.resource.name"] == "federated-training"
    (action,) = automation["actions"]
    assert action["type"] == "change-flow-run-state" and action["state"] == "CRASHED"


def _champion(stack) -> str | None:
    """The version ``fedrec-mf``'s champion alias points at; None before it has one."""
    from tasks.tracking import _champion_version

    version = _champion_version(stack["env"]["MLFLOW_TRACKING_URI"], "fedrec-mf")
    return None if version is None else version.version


def test_http_trigger_trains_registers_and_sets_the_champion(stack):
    # a model of its own, so that its first version is this run's whatever ran before
    status, run = _create_run(stack, SMALL | {"model_name": "fedrec-http"})
    assert status == 201, run

    finished = _wait(stack, run["id"])

    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    # the outcome in the state's message, for whoever polls the API
    assert finished["state"]["message"].startswith(
        "model fedrec-http version 1: promoted to champion"
    )
    assert finished["parameters"]["warm_start"] is True and finished["parameters"]["rounds"] == 2
    version = stack["mlflow"].get_model_version_by_alias("fedrec-http", "champion")
    assert str(version.version) == "1"
    assert version.tags["fedrec.promoted"] == "true"
    assert not (stack["worker_home"] / "mlflow.db").exists()  # not the worker's own store


def test_two_runs_at_once_run_one_after_the_other(stack):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = _versions(stack)
    status, by_http = _create_run(stack, SMALL | {"seed": 11})
    assert status == 201, by_http
    with temporary_settings({PREFECT_API_URL: stack["api"]}):
        by_python = run_deployment(DEPLOYMENT, parameters=SMALL | {"seed": 12}, timeout=0)

    first = _wait(stack, by_http["id"])
    second = _wait(stack, str(by_python.id))

    assert first["state"]["type"] == second["state"]["type"] == "COMPLETED"
    spans = sorted(
        (datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"]))
        for r in (first, second)
    )
    assert spans[0][1] <= spans[1][0], f"runs overlapped: {spans}"
    assert _versions(stack) == before + 2


def test_prefect_cli_trigger_with_p_overrides(stack):
    before = _versions(stack)
    args = [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT]
    for key, value in (SMALL | {"seed": 13, "rounds": 1}).items():
        args += ["-p", f"{key}={value}"]
    done = subprocess.run(args, env=stack["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = next(line.split()[-1] for line in done.stdout.splitlines() if "UUID" in line)

    finished = _wait(stack, run_id)

    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    assert finished["parameters"]["rounds"] == 1
    assert _versions(stack) == before + 1


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [({"rounds": -1}, "rounds"), ({"algorithm": "svd"}, "algorithm"), ({"roundz": 5}, "roundz"),
     # the simulation's: for tests and benchmarks, never a production schedule
     ({"attack": "scale", "attack_fraction": 0.2, "algorithm": "fedavg"}, "attack"),
     ({"fault_probability": 0.5}, "fault_probability"),
     # what the configuration would refuse in the run's first second, in the queue's slot
     ({"model_name": "bad name!"}, "model_name"), ({"train": "/data/ratings.csv"}, "test")],
)  # fmt: skip
def test_invalid_parameters_are_refused_by_the_server(stack, parameters, expected):
    before = _flow_runs(stack)
    status, body = _create_run(stack, parameters)
    assert status in (409, 422), body
    assert expected in json.dumps(body)
    assert _flow_runs(stack) == before  # refused at creation: no flow run exists to fail later


def test_missing_data_path_fails_before_training_and_leaves_the_registry(stack):
    before, champion = _versions(stack), _champion(stack)
    status, run = _create_run(stack, {"data": "/nowhere/ratings.csv"})
    assert status == 201, run

    finished = _wait(stack, run["id"])

    assert finished["state"]["type"] == "FAILED"
    # the state's message is the CLI's line, not pydantic's multi-line report
    message = finished["state"]["message"]
    assert "ConfigError: invalid configuration: data='/nowhere/ratings.csv': no such" in message
    assert "no such file or folder" in message and "\n" not in message and "pydantic" not in message
    assert _versions(stack) == before
    assert _champion(stack) == champion


def test_the_schedule_produced_scheduled_runs(stack):
    deployment_id = stack["deployment"]["id"]
    query = {
        "flow_runs": {
            "deployment_id": {"any_": [deployment_id]},
            "state": {"type": {"any_": ["SCHEDULED"]}},
        }
    }
    deadline = time.time() + 60
    scheduled: list = []
    while time.time() < deadline and not scheduled:
        status, scheduled = _http("POST", f"{stack['api']}/flow_runs/filter", query)
        assert status == 200, scheduled
        scheduled = [r for r in scheduled if r.get("auto_scheduled")]
        time.sleep(1)
    assert scheduled, "the scheduler created no runs from the cron schedule"
    starts = [datetime.fromisoformat(r["expected_start_time"]) for r in scheduled]
    assert all((t.hour, t.minute) == (2, 0) for t in starts)


def _running(stack, run_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while (run := _http("GET", f"{stack['api']}/flow_runs/{run_id}")[1])["state"][
        "type"
    ] != "RUNNING":
        assert time.time() < deadline, run["state"]
        time.sleep(1)
    return run


def test_a_run_its_operator_cancels_is_killed_in_mlflow_not_failed(stack):
    """A cancel (the UI, the API, ``prefect flow-run cancel``) stops the run's process with the
    signal a crash or ``kill`` sends; the MLflow run said FAILED, TerminationSignal."""
    status, run = _create_run(stack, SMALL | {"rounds": 1000, "model_name": "cancelled"})
    assert status == 201, run
    _running(stack, run["id"])
    mlflow_client = stack["mlflow"]
    query = f"tags.`prefect.flow_run_id` = '{run['id']}'"
    deadline = time.time() + 120
    while not (found := mlflow_client.search_runs(_experiments(stack), query)):
        assert time.time() < deadline, "no MLflow run for the flow run"
        time.sleep(1)
    cancel = {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}
    status, answer = _http("POST", f"{stack['api']}/flow_runs/{run['id']}/set_state", cancel)
    assert status in (200, 201), answer

    ended = _wait(stack, run["id"], timeout=180)

    assert ended["state"]["type"] == "CANCELLED", ended["state"]
    (tracked,) = found
    deadline = time.time() + 60
    while (info := mlflow_client.get_run(tracked.info.run_id)).info.status == "RUNNING":
        if time.time() > deadline:
            # the worker stopped the process before its last write (a loaded machine, a busy
            # SQLite store): the next run closes it, as this call does
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from tasks.tracking import close_ended_runs

            with temporary_settings({PREFECT_API_URL: stack["api"]}):
                close_ended_runs.fn(stack["env"]["MLFLOW_TRACKING_URI"])
            info = mlflow_client.get_run(tracked.info.run_id)
            break
        time.sleep(3)  # not more often: the run's own last writes share the SQLite store
    assert info.info.status == "KILLED", info.data.tags.get("fedrec.error")
    assert info.data.tags["fedrec.error"] == "cancelled in Prefect"


def _experiments(stack) -> list[str]:
    return [e.experiment_id for e in stack["mlflow"].search_experiments()]


def test_a_run_whose_worker_is_killed_with_it_becomes_crashed(stack):
    """Last in this file: it kills the worker. Nothing is left to report the run's end, so
    only the silent-run automation can end it; it does after three heartbeat periods, which
    frees the deployment's slot for the next run."""
    window = [sys.executable, "-m", "fedrec.silent_runs", "--within", str(3 * HEARTBEAT)]
    done = subprocess.run(window, env=stack["env"], cwd=REPO, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    status, run = _create_run(stack, SMALL | {"rounds": 1000})  # minutes of rounds
    assert status == 201, run
    deadline = time.time() + 300
    while (state := _http("GET", f"{stack['api']}/flow_runs/{run['id']}")[1])["state"][
        "type"
    ] != "RUNNING":
        assert time.time() < deadline, state["state"]
        time.sleep(1)
    time.sleep(HEARTBEAT + 5)  # a heartbeat or two sent
    running = _http("GET", f"{stack['api']}/flow_runs/{run['id']}")[1]
    assert running["state"]["type"] == "RUNNING", running["state"]
    worker = stack["workers"][-1]
    os.killpg(worker.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # the flow's own process, if not in the group
        os.kill(int(running["infrastructure_pid"]), signal.SIGKILL)
    worker.wait(timeout=30)
    try:
        crashed = _wait(stack, run["id"], timeout=3 * HEARTBEAT + 180)
    finally:
        stack["start_worker"]()  # for whatever runs after this file's tests
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]
    assert crashed["state"]["message"].startswith(f"no heartbeat for {3 * HEARTBEAT} s")
