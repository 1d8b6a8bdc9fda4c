"""``--dask-address``: the flow's client tasks on a Dask cluster it did not start (a `dask
scheduler` and two `dask worker` processes started here on free loopback ports), with the same
model as the thread runner's, and every task run in one of those two worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from fedrec.config import TrainingConfig
from fedrec.local_server import free_port
from tests.flows.dask_probe import PROBE_DIR, finished_tasks
from tests.flows.helpers import tracking_store

REPO = Path(__file__).resolve().parents[2]
TINY = {"synthetic_users": 80, "synthetic_items": 40, "synthetic_interactions": 1_200,
        "factors": 3, "rounds": 2, "clients": 3, "skip_if_unchanged": False}  # fmt: skip

pytestmark = pytest.mark.slow


def _stop(proc: subprocess.Popen) -> None:
    """Terminate one process this test started, by its id; kill it if it does not stop."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture
def cluster(tmp_path, prefect_server):
    """A scheduler and two single-threaded workers (no nanny: the worker is the process started
    here, so its id is known), reporting task runs to this session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    probe = tmp_path / "probe"
    probe.mkdir()
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), PROBE_DIR: str(probe),
                        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    dask = [str(Path(sys.executable).parent / "dask")]
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("scheduler", "worker-0", "worker-1")]  # noqa: SIM115
    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=env, cwd=REPO, stdout=logs[0], stderr=subprocess.STDOUT,
        ))  # fmt: skip
        for i in (1, 2):
            started.append(subprocess.Popen(
                [*dask, "worker", address, "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1",
                 "--no-dashboard", "--preload", "tests.flows.dask_probe"],
                env=env, cwd=REPO, stdout=logs[i], stderr=subprocess.STDOUT,
            ))  # fmt: skip
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield {"address": address, "workers": {p.pid for p in started[1:]}, "probe": probe}
    finally:
        for proc in reversed(started):
            _stop(proc)
        for log in logs:
            log.close()


def test_an_external_dask_cluster_runs_the_client_tasks_and_gives_the_thread_runners_model(
    cluster, tmp_path
):
    from flows.training import training_flow

    with tracking_store(tmp_path / "home") as store:
        config = TrainingConfig(tracking_uri=store["uri"], model_name="external", task_runner="dask",
                                dask_address=cluster["address"], **TINY)  # fmt: skip
        summary = training_flow(config.task_runner, config.dask_address)(**config.model_dump())
        reference = TrainingConfig(tracking_uri=store["uri"], model_name="threads", **TINY)
        training_flow()(**reference.model_dump())
        mlflow.set_tracking_uri(store["uri"])
        served = {
            name: mlflow.pyfunc.load_model(f"models:/{name}/latest").unwrap_python_model()
            for name in ("external", "threads")
        }

    np.testing.assert_allclose(
        served["external"].recommender.params.factors,
        served["threads"].recommender.params.factors,
        atol=1e-10,
    )
    assert summary["metrics"]["system/clients"] == 3.0
    ran = finished_tasks(cluster["probe"])
    # every task ran in one of the two worker processes started above, none in this one
    assert set(ran) <= cluster["workers"] and os.getpid() not in ran, (ran, cluster["workers"])
    assert sum(len(keys) for keys in ran.values()) >= 3 * TINY["rounds"], ran
