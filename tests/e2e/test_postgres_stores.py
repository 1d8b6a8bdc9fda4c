"""`fedrec train` against the production stores: PostgreSQL behind a Prefect server and an MLflow
server whose artifact proxy is the only way to the artifact folder. Every check reads the stores
themselves: Prefect's and MLflow's tables in PostgreSQL with psql, the registry over HTTP, the
artifact folder on disk, the process table after they stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.stores import stop_stores
from tests.e2e.stores import live, postgres_stores, process_tree, psql, require_postgres

__all__ = ["postgres_stores"]  # the fixture, imported to be used here

ROUNDS, CLIENTS = 3, 3
MODEL = "fedrec-pg"
SIZES = "synthetic_users: 300\nsynthetic_items: 150\nsynthetic_interactions: 9000\n"


def _train(stores, tmp_path: Path) -> dict:
    """A real `fedrec train` process reporting to the stores; its --json summary."""
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text(SIZES)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PREFECT_API_URL": stores.prefect_api, "FEDREC_HOME": str(tmp_path / "home")}
    cli = Path(sys.executable).parent / "fedrec"
    done = subprocess.run(
        [str(cli), "train", "--data", "synthetic", "--config", str(sizes), "--rounds", str(ROUNDS),
         "--clients", str(CLIENTS), "--factors", "4", "--seed", "3", "--model-name", MODEL,
         "--tracking-uri", stores.mlflow_uri, "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_training_is_recorded_in_postgresql_and_the_artifact_proxy_then_every_process_stops(
    postgres_stores, tmp_path
):
    from mlflow.tracking import MlflowClient

    stores = postgres_stores
    summary = _train(stores, tmp_path)
    run_id = summary["run_id"]
    flow_run_id = summary["prefect_flow_run_url"].rsplit("/", 1)[-1]

    # Prefect's records are in PostgreSQL: the flow run and one training task run per client
    # and round
    assert psql(
        stores,
        "prefect",
        f"SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
        f"WHERE r.id = '{flow_run_id}'",
    ) == [["federated-training", "COMPLETED"]]
    [[trained]] = psql(
        stores,
        "prefect",
        f"SELECT count(*) FROM task_run WHERE flow_run_id = '{flow_run_id}' "
        f"AND name LIKE 'train %' AND state_type = 'COMPLETED'",
    )
    assert int(trained) == ROUNDS * CLIENTS

    # MLflow over HTTP: the run's metrics per round, the version and its champion alias
    client = MlflowClient(tracking_uri=stores.mlflow_uri, registry_uri=stores.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["valid/rmse"] == pytest.approx(summary["metrics"]["valid/rmse"])
    steps = [m.step for m in client.get_metric_history(run_id, "train/rmse")]
    assert sorted(steps) == list(range(1, ROUNDS + 1))
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert (champion.version, champion.run_id) == (summary["model_version"], run_id)
    # ... and the MLflow server keeps them in PostgreSQL, not in a local file
    assert psql(stores, "mlflow", f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == [
        ["FINISHED"]
    ]
    assert psql(
        stores,
        "mlflow",
        f"SELECT alias, version FROM registered_model_aliases WHERE name = '{MODEL}'",
    ) == [["champion", summary["model_version"]]]

    # Artifacts went through the proxy into the stores' artifact folder, and nowhere local
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = (
        Path(stores.folder) / "artifacts" / run.info.experiment_id / run_id / "artifacts"
    ) / "final_metrics.json"
    downloaded = Path(client.download_artifacts(run_id, "final_metrics.json", str(tmp_path)))
    assert stored.read_bytes() == downloaded.read_bytes()
    assert json.loads(stored.read_text())  # a real file, not an empty placeholder
    model_files = list((Path(stores.folder) / "artifacts").glob("*/models/*/artifacts/MLmodel"))
    assert model_files, "the registered model's files are not in the artifact folder"
    assert not list(tmp_path.rglob("mlruns")) and not list(tmp_path.rglob("mlflow.db"))

    # Stopping by process id ends every process the stores started: the servers' children
    # and PostgreSQL's backends included
    started = set()
    for pid in stores.pids.values():
        started |= process_tree(pid)
    assert len(started) > 3
    stop_stores(Path(stores.folder))
    assert live(started) == set()
    assert not (Path(stores.folder) / "stores.json").exists()


def test_the_stores_commands_answer_in_one_line_without_stores(tmp_path):
    from click.testing import CliRunner

    from fedrec.cli import main

    require_postgres()
    runner = CliRunner()
    folder = tmp_path / "none"
    status = runner.invoke(main, ["stores", "status", "--dir", str(folder)])
    assert (status.exit_code, status.output) == (1, f"no stores are recorded in {folder}\n")
    stop = runner.invoke(main, ["stores", "stop", "--dir", str(folder)])
    assert (stop.exit_code, stop.output) == (0, f"no stores are recorded in {folder}\n")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = runner.invoke(
            main, ["stores", "start", "--dir", str(folder), "--port-base", str(port)]
        )
    assert start.exit_code == 2
    assert start.output == (
        f"fedrec: error: port {port} on 127.0.0.1 is in use: choose another --port-base\n"
    )
    assert not (folder / "postgres").exists() and not (folder / "stores.json").exists()
