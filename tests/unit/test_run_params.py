"""A training run's MLflow params are its whole configuration, within MLflow's limits of 100
params per request and 6000 characters per value."""

from __future__ import annotations

from mlflow import MlflowClient

from fedrec.config import TrainingConfig
from tasks.tracking import start_run


def test_every_setting_is_a_param_however_many_and_long_they_are(tmp_path, monkeypatch):
    settings = {f"setting_{i:03d}": str(i) for i in range(230)} | {"long": "x" * 7000}
    monkeypatch.setattr(TrainingConfig, "flat_params", lambda self: settings)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    _, run_id = start_run.fn(TrainingConfig(tracking_uri=uri), "fingerprint", None)

    logged = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert logged == settings | {"long": "x" * 6000}  # MLflow's longest value
