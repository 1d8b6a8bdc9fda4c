"""Warm start: does retraining from the champion reach the same quality in fewer rounds?

A nightly retrain sees yesterday's data plus new interactions. Here the "champion" is trained on
the older part of the data (all but the latest ``--new-share`` of interactions, by time), then the
full data is trained twice, from scratch and warm-started from the champion's item parameters
(new items start fresh). Reported: the test RMSE per round of both, and the rounds each needs to
come within 0.5% of the cold run's final RMSE. Same clients, same split, same seed.

    uv run python -m benchmarks.warm_start [--data ml-100k] [--rounds 15] [--algorithm als]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import HelpFormatter, load_movielens, machine, print_table, write_json
from models.data.partitions import build_clients
from models.data.schema import Interactions
from models.data.sharding import assign_clients, split_rows
from models.mf.federated import MFConfig, run_federated
from models.mf.params import ItemParams
from models.mf.recommend import warm_start_params

REG = {"ml-100k": 0.12, "ml-1m": 0.08}


def _older(data: Interactions, new_share: float) -> Interactions:
    """The interactions before the latest ``new_share`` of them (by timestamp)."""
    cutoff = np.quantile(data.frame["timestamp"], 1.0 - new_share)
    return Interactions(
        data.frame[data.frame["timestamp"] < cutoff],
        data.user_ids,
        data.item_ids,
        data.rating_scale,
        source=data.source,
    )


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--algorithm", default="als", choices=["als", "fedavg", "fedadam"])
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument(
        "--new-share",
        type=float,
        default=0.1,
        help="share of the latest interactions that are new tonight",
    )
    ns = parser.parse_args()
    data = load_movielens(ns.data)
    if data is None:
        raise SystemExit(1)
    config = MFConfig(
        algorithm=ns.algorithm, n_factors=ns.factors, reg=REG[ns.data], clip_to=data.rating_scale
    )
    client_of_user = assign_clients(
        data, n_clients=10, strategy="iid", rng=np.random.default_rng(0)
    )
    split = split_rows(data, method="random", valid_fraction=0.0, test_fraction=0.1)

    older = _older(data, ns.new_share)
    old_rows = data.frame.index.isin(older.frame.index)
    champion_clients = build_clients(older, client_of_user, split[old_rows])
    champion, _ = run_federated(
        champion_clients, data.n_items, config, rounds=ns.rounds, seed=0, eval_splits=()
    )
    clients = build_clients(data, client_of_user, split)

    # The champion's catalogue is what it saw; items it never saw start fresh, as in the flow.
    seen = np.unique(older.frame["item"].to_numpy())
    known = ItemParams(
        champion.params.factors[seen], champion.params.bias[seen], champion.params.global_mean
    )

    def warm(fresh: ItemParams) -> ItemParams:
        return warm_start_params(fresh, known, data.item_ids[seen], data.item_ids)[0]

    curves = {}
    for name, start in (("cold", None), ("warm", warm)):
        _, history = run_federated(
            clients,
            data.n_items,
            config,
            rounds=ns.rounds,
            seed=0,
            eval_splits=("test",),
            eval_ranking=False,
            start_from=start,
        )
        curves[name] = [h.metrics["test/rmse"] for h in history]
    target = 1.005 * curves["cold"][-1]
    rows = [
        {
            "start": name,
            "round_1": c[0],
            "round_3": c[min(2, len(c) - 1)],
            "final": c[-1],
            "rounds_to_target": rounds_to(c, target),
        }
        for name, c in curves.items()
    ]
    print(
        f"{ns.data}, {ns.algorithm}, k={ns.factors}: champion trained on the older {1 - ns.new_share:.0%} ({seen.size} of {data.n_items} items); target = 1.005 x cold final = {target:.4f}"
    )
    print_table(rows, list(rows[0]))
    path = write_json(
        f"warm_start_{ns.algorithm}",
        {
            "machine": machine(),
            "args": vars(ns),
            "summary": rows,
            "curves": curves,
            "target": target,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
