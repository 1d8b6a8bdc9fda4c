"""The memory bound of cohort waves: a round folds each wave of cohort answers into a running
sum and drops them, so the flow's peak memory does not grow with the number of cohorts. Each
run is measured in its own process (peak RSS from ``resource.getrusage``), on the same data cut
into 10 and into 300 cohorts. Measured on a loaded 2-core machine: 638 MB with 10 cohorts, 602 MB
with 300; with every answer of a round held until it ends (the wave made larger than the round),
the 300-cohort run peaked at 842 MB: the bound below fails then."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = {"synthetic_users": 3000, "synthetic_items": 2000, "synthetic_interactions": 90_000,
        "factors": 32, "rounds": 2, "eval_every": 10, "partition": "per-user",
        "client_fraction": 1.0, "skip_if_unchanged": False}  # fmt: skip
SCRIPT = """
import json, resource, sys
from fedrec.config import TrainingConfig
from flows.training import federated_training
config = TrainingConfig(**json.loads(sys.argv[1]))
summary = federated_training(**config.model_dump())
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "run_id": summary["run_id"]}))
"""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _peak_mb(tmp_path: Path, cohort_size: int) -> float:
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / f"cohorts-{cohort_size}"
    config = DATA | {"cohort_size": cohort_size, "tracking_uri": f"sqlite:///{home / 'mlflow.db'}",
                     "model_name": f"memory-{cohort_size}"}  # fmt: skip
    env = os.environ | {"FEDREC_HOME": str(home), "PREFECT_API_URL": PREFECT_API_URL.value(),
                        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(config)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def test_peak_memory_stays_flat_as_cohorts_grow(tmp_path, prefect_server):
    few, many = _peak_mb(tmp_path, 300), _peak_mb(tmp_path, 10)  # 10 and 300 cohorts

    print(f"peak RSS: 10 cohorts {few:.0f} MB, 300 cohorts {many:.0f} MB")
    assert many < few + 100, (few, many)  # held answers added 240 MB
