"""Crash and resume: `fedrec train` is killed with SIGKILL in the middle of training, `fedrec train
--resume RUN_ID` continues it into the same MLflow run, and the final model equals an
uninterrupted run with the same seed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

ARGS = ["--rounds", "6", "--clients", "3", "--factors", "4", "--seed", "4", "--fault-delay", "0.3"]
SIZES = "synthetic_users: 300\nsynthetic_items: 150\nsynthetic_interactions: 9000\n"
TRAIN_TASK = re.compile(r"^train \w+-(\d+) round-(\d+)$")  # "train client-2 round-5"


def _params(uri: str, model_uri: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().recommender.params


def _flow_run_state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def _flow_run_count() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()


def _trained_rounds(resumed_run_id: str) -> tuple[str, list[int]]:
    """The Prefect flow run that resumed ``resumed_run_id``, and the round of each of its
    training task runs (from the task-run records of the Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = [
            r
            for r in client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=100)
            if r.parameters.get("resume") == resumed_run_id
        ]
        assert len(runs) == 1, [r.parameters for r in runs]
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])), limit=200
        )
    rounds = [int(m.group(2)) for t in tasks if (m := TRAIN_TASK.match(t.name))]
    return str(runs[0].id), rounds


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("algorithm", ["als", "fedadam"])
def test_a_killed_training_resumes_into_the_same_run_and_ends_where_an_uninterrupted_one_does(
    tmp_path, prefect_server, algorithm
):
    """Resuming must continue from the checkpoint, not start again: the resumed flow run trains
    exactly the rounds after the last checkpoint (Prefect's task-run records), and the model ends
    where an uninterrupted run ends. For FedAdam that also needs the server optimizer's moments
    back from the checkpoint: zero moments in the resumed rounds give another model."""
    from prefect.settings import PREFECT_API_URL

    from fedrec.cli import main

    home = tmp_path / "home"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"FEDREC_HOME": str(home), "MLFLOW_TRACKING_URI": uri,
                        "PREFECT_API_URL": PREFECT_API_URL.value()}  # fmt: skip
    cli = Path(sys.executable).parent / "fedrec"
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text(SIZES)
    args = [*ARGS, "--algorithm", algorithm, "--config", str(sizes)]
    victim = subprocess.Popen([str(cli), "train", *args, "--model-name", "resumed"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        # a run keeps its latest checkpoint only: wait for one of round 3 or later
        while not [
            p for p in home.glob("workspaces/*/checkpoints/round-*.npz") if p.stem >= "round-0003"
        ]:
            assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no round-3 checkpoint within 240 s"
            time.sleep(0.1)
        os.killpg(victim.pid, signal.SIGKILL)  # mid-training: no cleanup of any kind
    finally:
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    checkpoints = sorted(home.glob("workspaces/*/checkpoints/round-*.npz"))
    assert len(checkpoints) <= 2, checkpoints  # the earlier rounds' were deleted (the kill may
    # fall between writing one and deleting the one before)
    run_id = checkpoints[-1].parents[1].name
    last = int(checkpoints[-1].stem.removeprefix("round-"))  # 3, or 4 if it was written meanwhile
    assert 3 <= last < 6
    if algorithm == "fedadam":  # the moments are part of the checkpoint, and not zero
        with np.load(checkpoints[-1], allow_pickle=False) as saved:
            assert np.abs(saved["opt_second"]).max() > 0
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed, nothing marked it
    assert not client.search_model_versions("name='resumed'")
    killed_flow_run = client.get_run(run_id).data.tags["prefect.flow_run_id"]
    assert _flow_run_state(killed_flow_run).type.value == "RUNNING"  # no heartbeat told otherwise

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        resumed = CliRunner().invoke(
            main, ["train", "--resume", run_id, "--json"], catch_exceptions=False
        )
        assert resumed.exit_code == 0, resumed.stderr[-3000:]
        # the next command found the killed run's process gone and marked its flow run
        assert "marked 1 earlier run(s) as crashed" in resumed.stderr
        assert f"(fedrec train --resume {run_id} continues it)" in resumed.stderr
        crashed = _flow_run_state(killed_flow_run)
        assert crashed.type.value == "CRASHED" and "--resume" in crashed.message
        reference = CliRunner().invoke(main, ["train", *args, "--model-name", "reference", "--json"],
                                       catch_exceptions=False)  # fmt: skip
        assert reference.exit_code == 0, reference.stderr[-3000:]

    # the resumed flow run trained the rounds after the checkpoint, each client once, and none
    # before it: a resume that silently started fresh would train rounds 1..last again
    resuming, rounds = _trained_rounds(run_id)
    assert sorted(set(rounds)) == list(range(last + 1, 7)), rounds
    assert len(rounds) == 3 * (6 - last)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == resuming  # the flow run that finished it
    steps = [m.step for m in client.get_metric_history(run_id, "valid/rmse")]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step once: none lost, none logged twice
    # registered from the resumed run (promoted or not: a small model may miss the baseline)
    (version,) = client.search_model_versions("name='resumed'")
    assert version.run_id == run_id
    got = _params(uri, "models:/resumed/latest")
    want = _params(uri, "models:/reference/latest")
    np.testing.assert_allclose(got.factors, want.factors, atol=1e-9)
    np.testing.assert_allclose(got.bias, want.bias, atol=1e-9)
    assert got.global_mean == pytest.approx(want.global_mean, abs=1e-12)


def test_resume_refuses_a_finished_or_unknown_run(tmp_path, prefect_server):
    from fedrec.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(tmp_path / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        done = CliRunner().invoke(main, ["train", "--rounds", "1", "--clients", "2", "--factors", "2", "--json"],
                                  catch_exceptions=False)  # fmt: skip
        import json

        run_id = json.loads(done.stdout)["run_id"]
        flow_runs = _flow_run_count()
        finished = CliRunner().invoke(main, ["train", "--resume", run_id])
        unknown = CliRunner().invoke(main, ["train", "--resume", "0" * 32])
        # a run that failed after registering (its server went away at the end): resuming it
        # would register the same model twice
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        client.set_terminated(run_id, status="FAILED")
        workspace = tmp_path / "kept"
        workspace.mkdir()
        (workspace / "manifest.json").write_text("{}")
        client.set_tag(run_id, "fedrec.workspace", str(workspace))
        registered = CliRunner().invoke(main, ["train", "--resume", run_id])
        refused_without_a_flow_run = _flow_run_count() == flow_runs

    # the message alone, without the exception's class name
    assert finished.exit_code == 2 and (
        f"fedrec: error: --resume {run_id}: the run finished; there is nothing to resume"
        in finished.stderr
    )
    assert (
        unknown.exit_code == 2
        and f"fedrec: error: --resume {'0' * 32}: no such MLflow run" in unknown.stderr
    )
    assert (
        registered.exit_code == 2
        and (
            f"fedrec: error: --resume {run_id}: the run already registered fedrec-mf version 1 "
            "(promoted to champion); there is nothing to resume; its workspace is removed"
        )
        in registered.stderr
    )
    assert not workspace.exists()
    assert [str(v.version) for v in client.search_model_versions("name='fedrec-mf'")] == ["1"]
    assert refused_without_a_flow_run  # refused before the flow: no failed flow run left behind


@pytest.mark.timeout(600)
def _terminated_once(victim: subprocess.Popen, ready: Callable[[], bytes]) -> bytes:
    """SIGTERM to ``victim`` once ``ready()`` returns (what it read of stderr); its whole
    stderr. The process is killed if it outlives the test."""
    try:
        seen = ready()
        victim.send_signal(signal.SIGTERM)
        _, rest = victim.communicate(timeout=120)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=30)
    return seen + rest


def test_a_terminated_training_says_in_one_line_how_to_resume_it(tmp_path, prefect_server):
    """SIGTERM is how systemd, Kubernetes and `timeout` stop a process: like Ctrl-C, the run
    ends with one line naming the run to resume, and exit status 1 (the run failed)."""
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "home"
    env = os.environ | {"FEDREC_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                        "PREFECT_API_URL": PREFECT_API_URL.value()}  # fmt: skip
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text(SIZES)
    cli = Path(sys.executable).parent / "fedrec"
    victim = subprocess.Popen([str(cli), "train", *ARGS, "--config", str(sizes)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def checkpointed() -> bytes:
        deadline = time.monotonic() + 240
        while not list(home.glob("workspaces/*/checkpoints/round-*.npz")):
            assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        return b""

    stderr = _terminated_once(victim, checkpointed)
    run_id = next(home.glob("workspaces/*")).name
    last = stderr.decode().strip().splitlines()[-1]
    assert victim.returncode == 1, stderr.decode()[-2000:]
    assert last == (
        f"fedrec: error: terminated (SIGTERM); fedrec train --resume {run_id} continues it"
    ), stderr.decode()[-2000:]


def test_a_training_terminated_while_it_loads_ends_in_one_line(tmp_path):
    """SIGTERM before the flow starts (while the libraries load): one line, exit status 1, and
    nothing to resume (no workspace, no MLflow store)."""
    home = tmp_path / "home"
    env = os.environ | {"FEDREC_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                        "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # fmt: skip
    cli = Path(sys.executable).parent / "fedrec"
    victim = subprocess.Popen([str(cli), "train", "--rounds", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def loading() -> bytes:
        seen = b""
        while b"loading Prefect, MLflow" not in seen:
            chunk = os.read(victim.stderr.fileno(), 4096)
            assert chunk, f"ended before loading: {seen.decode()[-2000:]}"
            seen += chunk
        return seen

    stderr = _terminated_once(victim, loading).decode()
    assert victim.returncode == 1, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "fedrec: error: terminated (SIGTERM)", stderr[-2000:]
    assert not (home / "workspaces").exists()
