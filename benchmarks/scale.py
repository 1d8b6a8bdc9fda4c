"""Seconds per round and peak memory of the real training flow as data and clients grow.

Every user is a client (``--partition per-user``), simulated in cohorts of 500 users per Prefect
task on the thread runner; explicit ALS with the default k. Each configuration runs in its own
process (a fresh temporary Prefect server and SQLite MLflow store), so its peak resident memory
(``ru_maxrss``: generating or loading, sharding, training, evaluation, registration) is its own.
Four rounds with ``--eval-every 2``: rounds 2 and 4 only train ("s/round": their median of the
flow's own ``round_seconds``; round 1 also reads the partitions), round 3 also evaluates the
incoming model on every user, full ranking over the catalogue ("s/round with evaluation").

1. vs interactions: synthetic data of 1M, 3M and 10M ratings (10k/30k/100k users, 5k/10k/20k
   items), and ML-1M, every user sampled each round;
2. vs clients per round: ML-1M's 6040 users as clients, sampling 10, 100, 1000 or all 6040 per
   round (``--client-fraction``; each user's own coin, so the counts are near these).

    uv run python -m benchmarks.scale              # everything, 3 processes each (~45 min on 2 cores)
    uv run python -m benchmarks.scale --quick      # 1M and ML-1M only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import HelpFormatter, machine, median, peak_rss_mb, print_table, write_json

SYNTHETIC = {  # interactions: (users, items)
    1_000_000: (10_000, 5_000),
    3_000_000: (30_000, 10_000),
    10_000_000: (100_000, 20_000),
}
ML1M_USERS = 6040


def child(spec: dict) -> dict:
    """One configuration in this process: the real flow, then its metrics and peak memory."""
    home = Path(tempfile.mkdtemp(prefix="fedrec-scale-"))
    os.environ |= {"FEDREC_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    (home / "prefect").mkdir()
    from fedrec.runtime import keep_freed_memory

    keep_freed_memory()
    from mlflow.tracking import MlflowClient

    from fedrec.config import TrainingConfig
    from flows.training import federated_training

    uri = f"sqlite:///{home / 'mlflow.db'}"
    config = TrainingConfig(tracking_uri=uri, skip_if_unchanged=False, partition="per-user",
                            model_name="scale", **spec)  # fmt: skip
    summary = federated_training(**config.model_dump())
    client = MlflowClient(tracking_uri=uri)
    seconds = [m.value for m in sorted(client.get_metric_history(summary["run_id"], "system/round_seconds"),
                                       key=lambda m: m.step)]  # fmt: skip
    clients = [m.value for m in client.get_metric_history(summary["run_id"], "system/clients")]
    return {
        "seconds_per_round": median([seconds[1], seconds[3]]),
        "seconds_with_evaluation": seconds[2],
        "round_seconds": seconds,
        "clients_per_round": median(clients),
        "client_tasks": summary["metrics"].get("system/client_tasks"),
        "test/rmse": summary["metrics"]["test/rmse"],
        "peak_rss_mb": peak_rss_mb(),
    }


def run_child(spec: dict, repeats: int) -> dict:
    """``repeats`` processes of one configuration: medians of their figures, and every run."""
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--child", json.dumps(spec)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{spec} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = ("seconds_per_round", "seconds_with_evaluation", "peak_rss_mb", "clients_per_round")
    return runs[0] | {k: median([r[k] for r in runs]) for k in keys} | {"runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1M synthetic and ML-1M only")
    parser.add_argument("--repeats", type=int, default=3, help="processes per configuration")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from benchmarks.common import load_movielens

    have_ml1m = load_movielens("ml-1m") is not None
    base = {"rounds": 4, "eval_every": 2, "cohort_size": 500}
    by_data = []
    sizes = [1_000_000] if args.quick else list(SYNTHETIC)
    for n in sizes:
        users, items = SYNTHETIC[n]
        spec = base | {
            "synthetic_users": users,
            "synthetic_items": items,
            "synthetic_interactions": n,
        }
        by_data.append({"data": f"synthetic {n / 1e6:g}M", "interactions": n, "users": users}
                       | run_child(spec, args.repeats))  # fmt: skip
        print(f"  {by_data[-1]['data']}: {by_data[-1]['seconds_per_round']:.2f} s/round, "
              f"{by_data[-1]['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    by_clients = []
    if have_ml1m:
        for target in (10, 100, 1000, ML1M_USERS):
            spec = base | {"data": "ml-1m", "client_fraction": min(1.0, target / ML1M_USERS)}
            by_clients.append(
                {"data": "ml-1m", "clients_target": target} | run_child(spec, args.repeats)
            )
            print(f"  ML-1M, ~{target} clients per round: "
                  f"{by_clients[-1]['seconds_per_round']:.2f} s/round", flush=True)  # fmt: skip
        full = by_clients[-1]
        by_data.append({"data": "ml-1m", "interactions": 1_000_209, "users": ML1M_USERS} | full)
    else:
        print("skipping ML-1M: not found under FEDREC_DATASETS")
    timing = ["seconds_per_round", "seconds_with_evaluation", "peak_rss_mb"]
    print_table(by_data, ["data", "interactions", "users", "client_tasks", *timing, "test/rmse"])
    print_table(by_clients, ["clients_target", "clients_per_round", "client_tasks", *timing])
    path = write_json("scale", {"args": vars(args), "machine": machine(), "by_interactions": by_data,
                                "by_clients": by_clients})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
