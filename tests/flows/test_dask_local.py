"""fedrec's local Dask cluster on Prefect's temporary server (no PREFECT_API_URL: a library
user's first flow run): the worker processes report the client task runs to the flow's server
and start no server of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

_SCRIPT = """
import json, sys
from uuid import UUID

if __name__ == "__main__":  # the cluster's worker processes import this file again
    from fedrec.config import TrainingConfig  # first, as the command line: fedrec's settings
    from flows.training import training_flow

    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    config = TrainingConfig(
        tracking_uri=sys.argv[1], task_runner="dask", synthetic_users=60, synthetic_items=30,
        synthetic_interactions=900, factors=3, rounds=2, clients=3,
    )
    summary = training_flow("dask")(**config.model_dump())
    run = mlflow.MlflowClient(sys.argv[1]).get_run(summary["run_id"])
    flow_run = UUID(run.data.tags["prefect.flow_run_id"])
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
    print(json.dumps({r.name: r.state.type.value for r in runs if r.name.startswith("train ")}))
"""


def test_the_local_clusters_workers_report_to_the_flows_temporary_server(tmp_path):
    (tmp_path / "run.py").write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "FEDREC_HOME": str(tmp_path / "home"),
            "PYTHONPATH": str(REPO),  # a busy machine starts a temporary server slowly
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), f"sqlite:///{tmp_path / 'mlflow.db'}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads(done.stdout.strip().splitlines()[-1])
    assert trained == {f"train client-{c} round-{r}": "COMPLETED" for c in range(3) for r in (1, 2)}
    started = [line for line in done.stderr.splitlines() if "Starting temporary server" in line]
    assert len(started) == 1, started  # the flow's own, none per worker
