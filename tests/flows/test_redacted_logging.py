"""What fedrec writes to MLflow about a run never holds a credential from a configured URI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import tracking_store

SECRETS = ("s3cret-pw", "daskpw", "tok-123")


def test_params_tags_and_config_json_of_a_run_hold_no_credentials(tmp_path):
    from tasks.tracking import log_artifacts, start_run

    with tracking_store(tmp_path) as store:
        config = TrainingConfig(
            tracking_uri=store["uri"], task_runner="dask",
            dask_address="tcp://scheduler:daskpw@10.0.0.5:8786",
        )  # fmt: skip
        uri, run_id = start_run.fn(config, "fingerprint", None)
        elsewhere = TrainingConfig(
            tracking_uri="postgresql://fedrec:s3cret-pw@db.example/mlflow?token=tok-123"
        )
        history = [{"train/rmse": 1.0, "valid/rmse": 1.1}]
        clients = pd.DataFrame({"client": [0], "rmse": [1.0]})
        log_artifacts.fn(uri, run_id, elsewhere, pd.DataFrame(), history, clients)

        run = store["client"].get_run(run_id)
        folder = Path(store["client"].download_artifacts(run_id, "config.json", str(tmp_path)))
        logged = json.dumps([run.data.params, run.data.tags]) + folder.read_text()

    assert not [s for s in SECRETS if s in logged]
    assert run.data.params["dask_address"] == "tcp://scheduler:***@10.0.0.5:8786"
    assert json.loads(folder.read_text())["tracking_uri"] == (
        "postgresql://fedrec:***@db.example/mlflow?token=***"
    )


@pytest.mark.parametrize(
    "server", ["https://fedrec:s3cret-pw@mlflow.example", "http://127.0.0.1:5000"]
)
def test_mlflow_prints_no_run_url_for_a_server(monkeypatch, tmp_path, server):
    """A server's run link would carry a credentialed URI's secret, and repeat fedrec's own."""
    import os

    from tasks.tracking import _client

    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")  # restored afterwards
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    _client(f"sqlite:///{tmp_path / 'plain.db'}")  # a file store prints none
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
    _client(server)
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
