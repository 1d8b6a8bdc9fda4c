"""Fault injection through the real training flow: rounds completed, clients per round and the
final test RMSE against a fault-free run, on ML-100K (federated ALS, 10 clients, 10 rounds).

The flow runs in this process on a temporary Prefect API and a temporary MLflow store, as
`fedrec train` does; each scenario is one training run.

    uv run python -m benchmarks.faults
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, print_table, write_json
from models.data.readers import datasets_dir

SCENARIOS = {
    "fault-free": {},
    "10% of task attempts fail, 2 retries": {"fault_probability": 0.1, "task_retries": 2},
    "30% fail, no retries, quorum 50%": {
        "fault_probability": 0.3,
        "task_retries": 0,
        "min_fraction": 0.5,
    },
    "client 3 down, quorum 8 of 10": {"fault_clients": (3,), "task_retries": 1, "min_clients": 8},
    "delays (mean 0.1 s), deadline 1 s": {
        "fault_delay": 0.1,
        "round_timeout": 1.0,
        "min_fraction": 0.5,
    },
    "50% fail, no retries, quorum 90%": {
        "fault_probability": 0.5,
        "task_retries": 0,
        "min_fraction": 0.9,
    },
}


def main() -> None:
    if not (datasets_dir() / "ml-100k").is_dir():
        print(f"skipping: ml-100k not found under {datasets_dir()}")
        return
    home = Path(tempfile.mkdtemp(prefix="fedrec-faults-"))
    os.environ |= {"FEDREC_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    (home / "prefect").mkdir()
    from mlflow.tracking import MlflowClient

    from fedrec.config import TrainingConfig
    from flows.rounds import QuorumError
    from flows.training import federated_training

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    rows, clean = [], None
    base = {"data": "ml-100k", "clients": 10, "rounds": 10, "factors": 32, "reg": 0.12, "retry_backoff": 0.0,
            "tracking_uri": uri, "skip_if_unchanged": False, "model_name": "faults"}  # fmt: skip
    for name, fields in SCENARIOS.items():
        config = TrainingConfig(**(base | fields))
        started = time.perf_counter()
        try:
            summary = federated_training(**config.model_dump())
        except QuorumError as err:
            rows.append({"scenario": name, "rounds_completed": None, "outcome": f"aborted: {err}",
                         "seconds": time.perf_counter() - started})  # fmt: skip
            print(f"  {name}: aborted ({err})", flush=True)
            continue
        answered = [m.value for m in client.get_metric_history(summary["run_id"], "system/clients")]
        rmse = summary["metrics"]["test/rmse"]
        clean = clean or rmse
        rows.append({"scenario": name, "rounds_completed": len(answered),
                     "clients_per_round": sum(answered) / len(answered), "min_clients_in_a_round": min(answered),
                     "test/rmse": rmse, "vs_fault_free": rmse / clean - 1, "outcome": "completed",
                     "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"  {name}: {len(answered)} rounds, RMSE {rmse:.4f}", flush=True)
    print_table(rows, ["scenario", "rounds_completed", "clients_per_round", "min_clients_in_a_round",
                       "test/rmse", "vs_fault_free", "outcome", "seconds"])  # fmt: skip
    print(f"wrote {write_json('faults_ml-100k', {'machine': machine(), 'rows': rows})}")


if __name__ == "__main__":
    main()
