"""Shared set-up of the flow tests: a FEDREC_HOME with its own MLflow SQLite store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient


@contextlib.contextmanager
def tracking_store(home: Path) -> Iterator[dict[str, Any]]:
    """FEDREC_HOME set to ``home``, MLFLOW_TRACKING_URI unset, and the store's URI and client."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{home / 'mlflow.db'}"
        yield {"uri": uri, "client": MlflowClient(tracking_uri=uri, registry_uri=uri), "home": home}
