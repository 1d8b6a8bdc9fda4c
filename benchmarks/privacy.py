"""Privacy against utility on ML-1M, and what secure aggregation costs.

1. User-level DP: federated ALS test RMSE at epsilon in {1, 2, 4, 8, 16, none}, delta = 1/users.
   Protocol: Surprise's fold 0 (`KFold(5, shuffle=True, random_state=0)`, 20% test), users in 10
   iid clients, k = ``--factors``, ``--rounds`` rounds; each user contributes at most
   ``--max-items`` rows per round (factor clip 0.5, residual clip 2); the noise multiplier is
   calibrated to the whole training's epsilon by the RDP accountant.
2. The same for implicit feedback: implicit-ALS test NDCG@10 (full ranking) with RecBole's
   protocol (ratings >= 3 are positives, each user's split 8:1:1), 10 iid clients, k =
   ``--implicit-factors``, reg ``--implicit-reg``, ``--rounds`` rounds, no kNN or re-ranker (they
   have no DP mechanism); bounds of ``UserLevelDP.for_implicit``.
3. Secure aggregation: seconds and bytes per round of the same ALS plain and through the
   secure-aggregation protocol (models/privacy/secagg_plus_driver.py: signed keys, Shamir-shared
   masks, every message through bytes; all parties in this process), with no dropout and with 2
   of the 10 clients vanishing after sharing their keys; 10 clients, no DP, median of
   ``--repeats`` rounds.

    uv run python -m benchmarks.privacy
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
from sklearn.model_selection import KFold

from benchmarks.common import load_movielens, machine, print_table, write_json
from benchmarks.ranking import recbole_split
from fedrec.runtime import keep_freed_memory
from models.client import TEST, TRAIN
from models.data.partitions import build_clients
from models.data.schema import keep_positives
from models.data.sharding import assign_clients
from models.federation.sampling import client_rng
from models.mf.federated import (
    MFConfig,
    client_rating_sums,
    client_update,
    from_dense_sum,
    init_global_state,
    run_federated,
    server_update,
    to_dense,
)
from models.privacy.dp import UserLevelDP, calibrate
from models.privacy.identity import generate_identity
from models.privacy.secagg_plus import RoundConfig, default_threshold
from models.privacy.secagg_plus_driver import run_round
from models.ranking.federated import RankingConfig, run_two_stage

EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0, None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="ml-1m", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--factors", type=int, default=8)
    parser.add_argument("--reg", type=float, default=0.08)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-items", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implicit-factors", type=int, default=16)
    parser.add_argument("--implicit-reg", type=float, default=10.0)
    args = parser.parse_args()
    keep_freed_memory()
    data = load_movielens(args.data)
    if data is None:
        return
    split = np.full(len(data), TRAIN, dtype=np.int8)
    split[next(KFold(5, shuffle=True, random_state=0).split(np.arange(len(data))))[1]] = TEST
    owner = assign_clients(data, n_clients=10, strategy="iid", rng=np.random.default_rng(0))
    clients = build_clients(data, owner, split)
    delta = 1.0 / data.n_users
    base = MFConfig(n_factors=args.factors, reg=args.reg, clip_to=data.rating_scale)
    rows = []
    for eps in EPSILONS:
        config = base
        sigma = None
        if eps is not None:
            sigma = calibrate(eps, 1.0, args.rounds, delta, full=1)  # + the global mean's release
            config = replace(base, dp=UserLevelDP(sigma, args.max_items, shares=len(clients)))
        started = time.perf_counter()
        _, history = run_federated(clients, data.n_items, config, rounds=args.rounds,
                                   eval_splits=("test",), eval_ranking=False)  # fmt: skip
        rmse = history[-1].metrics["test_rmse"]
        rows.append({"epsilon": "none" if eps is None else eps, "delta": delta, "noise_multiplier": sigma,
                     "test_rmse": rmse, "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"  epsilon {rows[-1]['epsilon']}: RMSE {rmse:.4f}", flush=True)
    print_table(rows, ["epsilon", "noise_multiplier", "test_rmse", "seconds"])
    ranking = implicit_utility(data, args)
    print_table(
        ranking, ["epsilon", "noise_multiplier", "valid_ndcg_at_10", "test_ndcg_at_10", "seconds"]
    )

    overhead = secure_overhead(clients, data.n_items, base, args.repeats)
    print_table(overhead, ["mode", "seconds_per_round", "mb_per_client", "mb_per_round"])
    path = write_json(f"privacy_{args.data}", {"args": vars(args), "machine": machine(),
                                               "dp": rows, "dp_implicit": ranking,
                                               "secure_aggregation": overhead})  # fmt: skip
    print(f"wrote {path}")


def implicit_utility(data, args: argparse.Namespace) -> list[dict]:
    """Implicit-ALS NDCG@10 at each epsilon (RecBole's protocol, ALS order, no re-ranker)."""
    positives = keep_positives(data, 3.0)
    split = recbole_split(positives, 0)
    owner = assign_clients(positives, n_clients=10, strategy="iid", rng=np.random.default_rng(0))
    clients = build_clients(positives, owner, split)
    delta = 1.0 / positives.n_users
    base = RankingConfig(n_factors=args.implicit_factors, reg=args.implicit_reg, ranker=None)
    rows = []
    for eps in EPSILONS:
        config, sigma = base, None
        if eps is not None:
            sigma = calibrate(eps, 1.0, args.rounds, delta)
            config = replace(base, dp=UserLevelDP.for_implicit(sigma, args.max_items, len(clients)))
        started = time.perf_counter()
        result = run_two_stage(clients, positives.n_items, config, rounds=args.rounds,
                               eval_splits=("valid", "test"))  # fmt: skip
        final = result.history[-1]
        rows.append({"epsilon": "none" if eps is None else eps, "delta": delta, "noise_multiplier": sigma,
                     "valid_ndcg_at_10": final["valid_ndcg_at_10"], "test_ndcg_at_10": final["test_ndcg_at_10"],
                     "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"  implicit, epsilon {rows[-1]['epsilon']}: NDCG@10 {final['test_ndcg_at_10']:.4f}",
              flush=True)  # fmt: skip
    return rows


def secure_overhead(clients, n_items: int, config: MFConfig, repeats: int) -> list[dict]:
    """One ALS round timed plain and through the secure-aggregation protocol (all parties in this
    process), without and with dropouts; bytes are what the clients upload in every phase."""
    state = init_global_state(n_items, config, [client_rating_sums(c) for c in clients], 0)
    identities = {c.client_id: generate_identity() for c in clients}
    registry = {u: key.public_key() for u, key in identities.items()}
    n = len(clients)
    dropped = {clients[1].client_id, clients[2].client_id}  # 20% of 10 clients
    modes = {
        "plain ALS round": None,
        "secure aggregation": {},
        "secure, 2 dropouts": {"mask": dropped},
    }
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    uploaded: dict[str, float] = {}
    for r in range(1, repeats + 1):
        for mode, drop in modes.items():
            started = time.perf_counter()
            updates = [
                client_update(c, state.params, config, client_rng(0, r, c.client_id))
                for c in clients
            ]
            if drop is None:
                server_update(state, updates, config)
                uploaded[mode] = sum(u.nbytes() for u in updates)
            else:
                dense = {u.client_id: to_dense(u, n_items, config) for u in updates}
                size = next(iter(dense.values())).size
                round_config = RoundConfig("benchmark", r, n, size, default_threshold(n))
                result = run_round(dense, round_config, identities, registry, drop)
                server_update(state, [from_dense_sum(result.total, n_items, config)], config)
                uploaded[mode] = sum(result.cost.bytes_up.values())
            seconds[mode].append(time.perf_counter() - started)
    return [
        {
            "mode": mode,
            "seconds_per_round": statistics.median(seconds[mode]),
            "mb_per_client": uploaded[mode] / n / 1e6,
            "mb_per_round": uploaded[mode] / 1e6,
        }
        for mode in modes
    ]


if __name__ == "__main__":
    main()
