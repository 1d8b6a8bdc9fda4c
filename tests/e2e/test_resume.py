"""Crash and resume: `fedrec train` is killed with SIGKILL in the middle of training, `fedrec train
--resume RUN_ID` continues it into the same MLflow run, and the final model equals an
uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

ARGS = ["--rounds", "6", "--clients", "3", "--factors", "4", "--seed", "4", "--fault-delay", "0.3"]
SIZES = "synthetic_users: 300\nsynthetic_items: 150\nsynthetic_interactions: 9000\n"


def _params(uri: str, model_uri: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().recommender.params


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_training_resumes_into_the_same_run_and_ends_where_an_uninterrupted_one_does(
    tmp_path, prefect_server
):
    from prefect.settings import PREFECT_API_URL

    from fedrec.cli import main

    home = tmp_path / "home"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"FEDREC_HOME": str(home), "MLFLOW_TRACKING_URI": uri,
                        "PREFECT_API_URL": PREFECT_API_URL.value()}  # fmt: skip
    cli = Path(sys.executable).parent / "fedrec"
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text(SIZES)
    args = [*ARGS, "--config", str(sizes)]
    victim = subprocess.Popen([str(cli), "train", *args, "--model-name", "resumed"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list(home.glob("workspaces/*/checkpoints/round-0003.npz")):
            assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no round-3 checkpoint within 240 s"
            time.sleep(0.1)
        os.killpg(victim.pid, signal.SIGKILL)  # mid-training: no cleanup of any kind
    finally:
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    run_id = next(home.glob("workspaces/*/checkpoints/round-0003.npz")).parents[1].name
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed, nothing marked it
    assert not client.search_model_versions("name='resumed'")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        resumed = CliRunner().invoke(
            main, ["train", "--resume", run_id, "--json"], catch_exceptions=False
        )
        assert resumed.exit_code == 0, resumed.stderr[-3000:]
        reference = CliRunner().invoke(main, ["train", *args, "--model-name", "reference", "--json"],
                                       catch_exceptions=False)  # fmt: skip
        assert reference.exit_code == 0, reference.stderr[-3000:]

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "valid_rmse")]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step once: none lost, none logged twice
    version = client.get_model_version_by_alias("resumed", "champion")
    assert version.run_id == run_id
    got = _params(uri, "models:/resumed@champion")
    want = _params(uri, "models:/reference@champion")
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
        finished = CliRunner().invoke(main, ["train", "--resume", run_id])
        unknown = CliRunner().invoke(main, ["train", "--resume", "0" * 32])

    assert (
        finished.exit_code == 2
        and "the run finished; there is nothing to resume" in finished.stderr
    )
    assert unknown.exit_code == 2 and "no such MLflow run" in unknown.stderr
