"""Registration is retried after a passing failure, not after one of the artifact store that a
retry seconds later meets again (each try would leave one more FAILED logged model)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from prefect import flow


class _Model:
    """What registration reads of a recommender before it logs it."""

    known_items = np.array(["a", "b"])
    requirements = ()
    request_columns = ()

    def save(self, folder) -> None:
        folder.mkdir(parents=True)


@pytest.mark.parametrize(
    ("error", "attempts"),
    [
        (OSError(errno.EROFS, "Read-only file system"), 1),
        (PermissionError(errno.EACCES, "Permission denied"), 1),
        (OSError(errno.ENOSPC, "No space left on device"), 1),
        (ConnectionError("the tracking server closed the connection"), 3),
    ],
)
def test_a_store_that_refuses_to_write_is_not_asked_again(
    prefect_server, tmp_path, monkeypatch, error, attempts
):
    import mlflow.pyfunc  # the module itself: ``mlflow.pyfunc`` may be a lazy stand-in
    from mlflow import MlflowClient

    from tasks.tracking import register_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("fedrec")).info.run_id
    tries = []

    def log_model(**kwargs):
        tries.append(kwargs["name"])
        raise error

    monkeypatch.setattr(mlflow.pyfunc, "log_model", log_model)

    @flow
    def register() -> None:
        task = register_model.with_options(retries=2, retry_delay_seconds=0)
        task.submit(uri, run_id, _Model(), "m", {}).wait()

    register()
    assert len(tries) == attempts
