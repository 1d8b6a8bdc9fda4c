"""Where fedrec keeps its local state (MLflow store, client partitions, the local Prefect server)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "FEDREC_HOME"


def fedrec_home() -> Path:
    """Where runs keep their state by default: ``$FEDREC_HOME``, else ``./.fedrec``."""
    return Path(os.environ.get(HOME_ENV, ".fedrec")).expanduser().resolve()
