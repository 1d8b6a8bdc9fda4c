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


def test_a_sites_run_is_named_after_the_sites_that_enrolled(tmp_path):
    """``als-k32-3c-10r``: three of the configured clients (sites) took part."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    by_key = {"clients": None, "partition": "by-key", "partition_key": "region"}
    for fields in ({}, by_key):  # 10 clients configured, or one per region
        config = TrainingConfig(tracking_uri=uri, factors=32, **fields)
        _, run_id = start_run.fn(config, "fingerprint", None, clients=3)
        assert client.get_run(run_id).info.run_name == "als-k32-3c-10r"
