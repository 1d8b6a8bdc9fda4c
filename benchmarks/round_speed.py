"""Seconds per federated round on ML-1M (ALS, k=64, 10 clients), with glibc's default allocator
and with ``fedrec.runtime.keep_freed_memory``, side by side in one run.

Each setting runs in its own process (the allocator is per process); the first round, which also
builds every client's row layout, is reported apart from the steady-state median.

    uv run python -m benchmarks.round_speed [--data ml-1m] [--rounds 8] [--factors 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import HelpFormatter, machine, median, peak_rss_mb, print_table, write_json


def measure(data: str, rounds: int, factors: int, clients: int, tuned: bool) -> dict:
    """One process: shard, then time `rounds` ALS rounds without evaluation."""
    import numpy as np

    from fedrec.runtime import keep_freed_memory
    from models.data.partitions import build_clients
    from models.data.readers import load_dataset
    from models.data.sharding import assign_clients
    from models.mf.federated import MFConfig, run_federated

    if tuned:
        keep_freed_memory()
    interactions = load_dataset(data)
    client_of_user = assign_clients(
        interactions, n_clients=clients, strategy="iid", rng=np.random.default_rng(0)
    )
    split = np.zeros(len(interactions), dtype=np.int8)  # every row trains: the round's full load
    shards = build_clients(interactions, client_of_user, split)
    _, history = run_federated(
        shards,
        interactions.n_items,
        MFConfig(n_factors=factors, reg=0.08),
        rounds=rounds,
        eval_splits=(),
    )
    seconds = [h.seconds for h in history]
    return {
        "first_round_s": seconds[0],
        "steady_median_s": median(seconds[1:]),
        "rounds_s": seconds,
        "upload_mb": history[-1].upload_bytes / 1e6,
        "peak_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="ml-1m")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting, alternating")
    parser.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        print(json.dumps(measure(ns.data, ns.rounds, ns.factors, ns.clients, ns.child == "tuned")))
        return
    from models.data.readers import datasets_dir

    if ns.data.startswith("ml-") and not (datasets_dir() / ns.data).is_dir():
        print(f"skipping: {ns.data} not found under {datasets_dir()} (set FEDREC_DATASETS)")
        return
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(ns.repeats):
        for setting in runs:  # alternate, so drift on a noisy machine hits both
            args = [
                sys.executable,
                "-m",
                "benchmarks.round_speed",
                "--child",
                setting,
                "--data",
                ns.data,
                "--rounds",
                str(ns.rounds),
                "--factors",
                str(ns.factors),
                "--clients",
                str(ns.clients),
            ]
            out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            print(f"{setting}: {runs[setting][-1]['steady_median_s']:.2f} s/round", flush=True)
    rows = []
    for setting, results in runs.items():
        rows.append(
            {
                "allocator": "glibc default" if setting == "default" else "keep_freed_memory",
                "steady_s_per_round": median([s for r in results for s in r["rounds_s"][1:]]),
                "first_round_s": median([r["first_round_s"] for r in results]),
                "upload_mb_per_round": results[0]["upload_mb"],
                "peak_mb": max(r["peak_mb"] for r in results),
            }
        )
    print()
    print_table(rows, list(rows[0]))
    path = write_json(
        "round_speed", {"machine": machine(), "args": vars(ns), "summary": rows, "runs": runs}
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
