"""Shared fixtures: one Prefect test server per session (it costs ~10 s to start), and each test
starting with the session's MLFLOW_TRACKING_URI."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect API (SQLite) for flow tests, stopped at the end of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _session_tracking_uri():
    """Restore MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI after each test: MLflow's
    set_tracking_uri and set_registry_uri write the run's store into this process's environment,
    and a later test's in-process command would read it as the user's own setting (a user's
    command starts from their environment), and a server it starts would look for models there."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
