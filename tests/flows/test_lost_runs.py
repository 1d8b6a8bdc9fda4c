"""A foreground `fedrec train` has no heartbeat: a run whose process died would show as running
forever. The next command marks it crashed, and only it: not a run whose process lives, nor a
worker's run (which records its process in another form and has its own heartbeat)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from fedrec.local_server import process_start


def _running_run(client, flow_name: str, owner: str | None, parameters: dict | None = None):
    from prefect import flow
    from prefect.states import Running

    def body(sites=None):
        return sites

    run = client.create_flow_run(
        flow(body, name=flow_name), parameters=parameters or {}, state=Running()
    )
    if owner is not None:
        client.update_flow_run(run.id, infrastructure_pid=owner)
    return run.id


def test_a_lost_run_of_sites_found_in_no_store_is_said_to_be_trained_again(prefect_server):
    from prefect.client.orchestration import get_client

    from fedrec.runtime import SITES_TRAINED_AGAIN, crash_lost_runs

    victim = subprocess.Popen(["sleep", "60"])
    owner = f"fedrec-foreground:{socket.gethostname()}:{victim.pid}:{process_start(victim.pid)}"
    victim.kill()
    victim.wait()
    with get_client(sync_client=True) as client:
        sites = _running_run(client, "lost-sites", owner, {"sites": "sites.yaml"})
        simulated = _running_run(client, "lost-sites", owner)

        assert len(crash_lost_runs("lost-sites")) == 2
        messages = {name: client.read_flow_run(run_id).state.message
                    for name, run_id in (("sites", sites), ("simulated", simulated))}  # fmt: skip
    assert messages["sites"].endswith(f"; {SITES_TRAINED_AGAIN}")
    assert "--resume <MLflow run id>" in messages["simulated"]


def test_a_flow_run_in_the_foreground_records_its_process_and_no_other_does(
    prefect_server, monkeypatch
):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    import fedrec.runtime
    from fedrec.runtime import foreground_flow, record_foreground_process

    @flow(name="records-its-process")
    def recorded() -> str:
        record_foreground_process(flow_run.get_id())
        return flow_run.get_id()

    monkeypatch.setattr(fedrec.runtime, "last_flow_run_id", None)
    background = recorded()  # a worker's or a served run: not a foreground command's
    assert fedrec.runtime.last_flow_run_id is None
    with foreground_flow():
        foreground = recorded()
        record_foreground_process(None)  # outside a flow run: nothing to record
    assert fedrec.runtime.last_flow_run_id == foreground
    with get_client(sync_client=True) as client:
        owners = {run_id: client.read_flow_run(run_id).infrastructure_pid
                  for run_id in (background, foreground)}  # fmt: skip
    me = os.getpid()
    assert owners == {
        background: None,
        foreground: f"fedrec-foreground:{socket.gethostname()}:{me}:{process_start(me)}",
    }


def test_only_runs_whose_foreground_process_is_gone_are_marked_crashed(
    prefect_server, tmp_path, monkeypatch
):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from fedrec.runtime import crash_lost_runs
    from tasks.tracking import close_lost_run

    host = socket.gethostname()
    victim = subprocess.Popen(["sleep", "60"])
    started = process_start(victim.pid)
    victim.kill()
    victim.wait()
    with get_client(sync_client=True) as client:
        dead = _running_run(client, "lost-runs", f"fedrec-foreground:{host}:{victim.pid}:{started}")
        alive = _running_run(
            client,
            "lost-runs",
            f"fedrec-foreground:{host}:{os.getpid()}:{process_start(os.getpid())}",
        )
        # the same PID reused by a later process is still a dead owner
        reused = _running_run(client, "lost-runs", f"fedrec-foreground:{host}:{os.getpid()}:1")
        worker = _running_run(client, "lost-runs", f"{host}:{victim.pid}")
        elsewhere = _running_run(
            client, "lost-runs", f"fedrec-foreground:other-host:{victim.pid}:{started}"
        )
        unowned = _running_run(client, "lost-runs", None)
        other_flow = _running_run(
            client, "another-flow", f"fedrec-foreground:{host}:{victim.pid}:{started}"
        )

        # the dead run's MLflow run still says RUNNING; the reused one's is in no store here. The
        # store is not the default one (FEDREC_HOME's), so the --resume command names it
        monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "home"))
        monkeypatch.setattr("fedrec.USER_TRACKING_URI", None)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        resume = f"fedrec train --resume {{}} --tracking-uri {uri} continues it"
        tracking = MlflowClient(tracking_uri=uri, registry_uri=uri)
        training = tracking.create_run(
            tracking.create_experiment("lost"), tags={"prefect.flow_run_id": str(dead)}
        ).info.run_id

        lost = crash_lost_runs("lost-runs", lambda flow_run_id: close_lost_run(uri, flow_run_id))

        names = {run_id: client.read_flow_run(run_id).name for run_id in (dead, reused)}
        states = {
            name: client.read_flow_run(run_id).state
            for name, run_id in [("dead", dead), ("alive", alive), ("reused", reused), ("worker", worker),
                                 ("elsewhere", elsewhere), ("unowned", unowned), ("other_flow", other_flow)]
        }  # fmt: skip
    assert {n for n, s in states.items() if s.type.value == "CRASHED"} == {"dead", "reused"}
    assert {n for n, s in states.items() if s.type.value == "RUNNING"} == {
        "alive", "worker", "elsewhere", "unowned", "other_flow"
    }  # fmt: skip
    assert sorted(lost, key=str) == sorted(
        [(names[dead], resume.format(training)), (names[reused], None)],
        key=str,
    )
    assert states["dead"].message.endswith(f"; {resume.format(training)}")
    assert str(victim.pid) in states["dead"].message
    assert "--resume <MLflow run id>" in states["reused"].message
    assert tracking.get_run(training).info.status == "KILLED"  # no longer running in MLflow
    # a run killed after it registered its model has nothing to resume, and is told so
    tracking.create_registered_model("m")
    tracking.create_model_version("m", f"runs:/{training}/model", run_id=training)
    assert close_lost_run(uri, str(dead)) == (
        f"run {training} registered m version 1: nothing to resume"
    )
    with get_client(sync_client=True) as client:  # marked once: a second sweep finds nothing
        assert crash_lost_runs("lost-runs") == []


def test_a_stop_signal_is_a_cancel_only_when_prefect_says_the_run_is_cancelling(
    prefect_server, monkeypatch
):
    """The worker stops a cancelled run's process with the same signal as systemd or ``kill``;
    only Prefect's state of the flow run tells a cancel (KILLED in MLflow) from a stop of a
    run nobody cancelled (a failure)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import TerminationSignal
    from prefect.states import Cancelling

    from flows.training import _cancelled

    stop = TerminationSignal(signal=15)
    with get_client(sync_client=True) as client:
        run = _running_run(client, "cancel-check", None)
        monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(run))
        assert _cancelled(stop) is False  # Running: stopped, not cancelled
        client.set_flow_run_state(run, Cancelling(), force=True)
        assert _cancelled(stop) is True
        assert _cancelled(RuntimeError("boom")) is False  # not the stop signal at all
        monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "00000000-0000-0000-0000-000000000000")
        assert _cancelled(stop) is False  # a flow run Prefect does not know: no cancel to tell


def test_a_lost_run_of_real_sites_is_not_offered_a_resume_and_says_why_it_was_closed(
    tmp_path, monkeypatch
):
    """A coordinator of a sites run killed mid-run: the next command said `fedrec train --resume
    ID ... continues it`, which then refused the run (a run of sites is trained again), and the
    run was KILLED with no word of why. It now says the run is trained again, tags why it was
    closed, and removes the workspace kept for the resume that cannot happen."""
    from mlflow import MlflowClient

    from models.data.partitions import MANIFEST
    from tasks.tracking import ERROR_TAG, LOST, close_lost_run, reopen_run, resumable_run

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("fedrec.USER_TRACKING_URI", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = tracking.create_experiment("lost")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / MANIFEST).write_text("{}")
    # killed between starting its MLflow run and tagging its sites: its configuration says
    config = '{"sites": "sites.yaml", "rounds": 3}'
    tags = {"prefect.flow_run_id": "flow-1", "fedrec.config": config,
            "fedrec.workspace": str(workspace)}  # fmt: skip
    run_id = tracking.create_run(experiment, tags=tags).info.run_id

    said = close_lost_run(uri, "flow-1")

    assert said == (
        f"run {run_id}: a run of real sites (--sites) is not resumed: train again with the same "
        "--sites"
    )
    assert "--resume" not in said.replace("is not resumed", "")
    run = tracking.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[ERROR_TAG] == LOST
    assert not workspace.exists() and "fedrec.workspace" not in run.data.tags
    with pytest.raises(Exception, match="a run of real sites"):
        resumable_run(uri, run_id)

    # a simulated run is still offered its resume, and says why it was closed too
    simulated = tracking.create_run(
        experiment, tags={"prefect.flow_run_id": "flow-2", "fedrec.config": '{"rounds": 3}'}
    ).info.run_id
    assert close_lost_run(uri, "flow-2") == (
        f"fedrec train --resume {simulated} --tracking-uri {uri} continues it"
    )
    assert tracking.get_run(simulated).data.tags[ERROR_TAG] == LOST
    reopen_run.fn(uri, simulated)  # resumed: running again, without its earlier end's error
    assert ERROR_TAG not in tracking.get_run(simulated).data.tags


# a flow run whose operator cancels it at one stage: the stage marks the flow run Cancelling
# and raises the stop signal, as the worker's SIGTERM does (Prefect's engine then ends the
# process with that signal, which is why this runs in a process of its own)
_CANCELLED_AT = """
import sys
from prefect.client.orchestration import get_client
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelling
import flows.training
from fedrec.config import TrainingConfig

def cancelled(*_, **__):
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.get_id(), Cancelling(), force=True)
    raise TerminationSignal(signal=15)

setattr(flows.training, sys.argv[1], cancelled)
config = TrainingConfig(tracking_uri=sys.argv[2], model_name="cancelled", synthetic_users=200,
                        synthetic_items=80, synthetic_interactions=4000, clients=2, factors=4,
                        rounds=1, skip_if_unchanged=False)
flows.training.federated_training(**config.model_dump())
"""


@pytest.mark.parametrize("stage", ["shard_clients", "publish_summary"])
def test_a_run_cancelled_at_any_stage_is_killed_in_mlflow_not_failed(
    prefect_server, tmp_path, stage
):
    """The operator cancels in Prefect and the worker's stop signal reaches the run while it
    shards its clients (a loaded machine stretches that stage) or after its rounds: either way
    MLflow says KILLED, cancelled in Prefect, not FAILED with the signal's name."""
    import sys

    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from prefect.settings import PREFECT_API_URL

    from tasks.tracking import CANCELLED, ERROR_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(),
                        "FEDREC_HOME": str(tmp_path / "home")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _CANCELLED_AT, stage, uri], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0, done.stderr[-3000:]  # the signal ended it
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = [r for r in client.search_runs(experiments, run_view_type=ViewType.ALL)
              if "fedrec.config" in r.data.tags]  # fmt: skip
    ended = (run.info.status, run.data.tags.get(ERROR_TAG))
    assert ended == ("KILLED", CANCELLED), done.stderr[-3000:]
