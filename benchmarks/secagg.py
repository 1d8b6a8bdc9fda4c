"""Cost of one secure-aggregation round: seconds (client and server side) and bytes per client,
for 10 clients with 0% and 20% dropouts, on vectors the size of ML-1M's explicit-feedback update.

The vector: ``items x (k(k+1)/2 + k + 1)`` values (each item's Gram upper triangle, right-hand side
and count; k = 16, 3,700 items gives 566,100 values). Every client and the server run in this one
process (models/privacy/secagg_plus_driver.py): messages go through their byte encoding and are
counted, each client's state is written and read back between phases, and a client's seconds are
its own work only (the clients run one after another here; in a deployment they run in parallel,
so a round's wall time is about the slowest client plus the server); encoding and decoding the
messages is counted only in the all-in-one-process wall time. Dropouts happen after the
clients shared their keys (the costly case: the server rebuilds the dropped clients' mask keys and
removes their pairwise masks). The pairwise-only masking of models/privacy/secagg.py is timed on
the same vectors for reference. Medians over ``--repeats``.

    uv run python -m benchmarks.secagg [--clients 10] [--items 3700] [--rank 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import HelpFormatter, machine, median, print_table, write_json
from models.privacy import secagg as pairwise_only
from models.privacy.identity import generate_identity
from models.privacy.secagg_plus import RoundConfig, default_threshold
from models.privacy.secagg_plus_driver import run_round


def measure(
    n_clients: int, size: int, dropout: float, repeats: int, degree: int | None
) -> dict[str, object]:
    """Median seconds and mean bytes per client of ``repeats`` rounds."""
    rng = np.random.default_rng(0)
    updates = {u: rng.normal(0, 1, size) for u in range(n_clients)}
    identities = {u: generate_identity() for u in range(n_clients)}
    registry = {u: k.public_key() for u, k in identities.items()}
    dropped = set(range(round(dropout * n_clients)))
    # SecAgg+: a majority of each neighbourhood (degree + 1 share holders)
    threshold = default_threshold(n_clients if degree is None else min(n_clients, degree + 1))
    client_mean, client_max, server, wall, up, down = [], [], [], [], [], []
    for r in range(repeats):
        config = RoundConfig("benchmark", r, n_clients, size, threshold, degree=degree)
        started = time.perf_counter()
        result = run_round(
            updates, config, identities, registry, drop={"mask": dropped}, state_through_bytes=True
        )
        wall.append(time.perf_counter() - started)
        expected = np.sum([updates[u] for u in result.survivors], axis=0)
        assert np.abs(result.total - expected).max() < n_clients * 2.0**-config.fraction_bits
        survivors = result.survivors
        seconds = [result.cost.client_seconds[u] for u in survivors]
        client_mean.append(float(np.mean(seconds)))
        client_max.append(max(seconds))
        server.append(result.cost.server_seconds)
        up.append(np.mean([result.cost.bytes_up[u] for u in survivors]))
        down.append(np.mean([result.cost.bytes_down[u] for u in survivors]))
    return {
        "protocol": "secagg" if degree is None else f"secagg+ (degree {degree})",
        "clients": n_clients,
        "dropouts": len(dropped),
        "values": size,
        "threshold": threshold,
        "client_s": median(client_mean),
        "client_max_s": median(client_max),
        "server_s": median(server),
        "all_in_one_process_s": median(wall),
        "up_MB_per_client": median(up) / 1e6,
        "down_MB_per_client": median(down) / 1e6,
    }


def measure_pairwise_only(n_clients: int, size: int, repeats: int) -> dict[str, object]:
    """The old protocol (pairwise masks only, no dropout recovery) on the same vectors."""
    rng = np.random.default_rng(0)
    updates = {u: rng.normal(0, 1, size) for u in range(n_clients)}
    wall = []
    for r in range(repeats):
        started = time.perf_counter()
        pairwise_only.secure_sum(updates, b"benchmark/%d" % r)
        wall.append(time.perf_counter() - started)
    return {
        "protocol": "pairwise only (old)",
        "clients": n_clients,
        "dropouts": 0,
        "values": size,
        "all_in_one_process_s": median(wall),
        "up_MB_per_client": (8 * size + 32) / 1e6,
        "down_MB_per_client": 32 * n_clients / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--items", type=int, default=3700)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--degree", type=int, default=None, help="also time SecAgg+ with it")
    args = parser.parse_args()

    k = args.rank
    size = args.items * (k * (k + 1) // 2 + k + 1)
    rows = []
    for degree in [None] + ([args.degree] if args.degree else []):
        for dropout in args.dropouts:
            rows.append(measure(args.clients, size, dropout, args.repeats, degree))
    rows.append(measure_pairwise_only(args.clients, size, args.repeats))
    print_table(
        rows,
        [
            "protocol",
            "clients",
            "dropouts",
            "values",
            "threshold",
            "client_s",
            "client_max_s",
            "server_s",
            "all_in_one_process_s",
            "up_MB_per_client",
            "down_MB_per_client",
        ],
    )
    path = write_json("secagg", {"args": vars(args), "machine": machine(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
