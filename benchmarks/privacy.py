"""Privacy against utility on ML-1M, and what secure aggregation costs.

1. User-level DP, explicit feedback, with the CLI's defaults: for each epsilon in {1, 2, 4, 8,
   16}, the model ``fedrec train --secure-aggregation --dp-epsilon E`` trains with nothing else
   given (its private defaults: rounds, rank, rows per user, quorum), delta = 1/users, test RMSE.
   Protocol: Surprise's fold 0 (`KFold(5, shuffle=True, random_state=0)`, 20% test), users in 10
   iid clients, every client in every round. With secure aggregation each client's noise share
   is sized for the protocol's threshold t (``shares``: the quorum, 8 of the 10 clients by
   default, or a majority if that is more), so the decoded sum of
   the 10 carries the calibrated noise or more; the same table without secure aggregation
   (``shares = 1``: each upload carries the full noise on its own) shows what calibrating against
   the server costs. Everything a private client sends is counted (the biases phase is one of the
   accounted rounds; no metrics leave a private client). Beside them, measured in the same run:
   non-private ALS with the CLI's defaults, its trivial baseline (global mean + item bias, the
   promotion gate's), the non-private bias model (global mean + user and item biases, alternating
   ridge fits), and the private model with factors trained after the biases (3 rounds, k = 4).
   The secure sum equals the plain sum (tests/unit/test_secagg.py); here the clients' noisy
   updates are summed in this process.
2. The same for implicit feedback: implicit-ALS test NDCG@10 (full ranking) with RecBole's
   protocol (ratings >= 3 are positives, each user's split 8:1:1), 10 iid clients, k =
   ``--implicit-factors``, reg ``--implicit-reg``, the CLI's private rounds and rows per user,
   noise shares of the secure-aggregation quorum, no kNN or re-ranker (they have no DP
   mechanism); bounds of ``UserLevelDP.for_implicit``.
3. Secure aggregation: seconds and bytes per round of the same ALS plain and through the
   secure-aggregation protocol (models/privacy/secagg_plus_driver.py: signed keys, Shamir-shared
   masks, every message through bytes; all parties in this process), with no dropout and with 2
   of the 10 clients vanishing after sharing their keys; 10 clients, no DP, median of
   ``--repeats`` rounds.
4. A run over real sites calibrates at the sites' per-run delta (``SITE_RUN_DELTA``, 1e-7), not
   at 1/users: section 1's private defaults without secure aggregation at both deltas, side by
   side (``--data ml-100k --clients 3`` is the sites demo's size).

    uv run python -m benchmarks.privacy
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace

import numpy as np
from sklearn.model_selection import KFold

from benchmarks.common import HelpFormatter, load_movielens, machine, print_table, write_json
from benchmarks.ranking import recbole_split
from fedrec.config import TrainingConfig
from fedrec.runtime import keep_freed_memory
from flows.rounds import quorum
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
from models.privacy.dp import UserLevelDP, calibrate, epsilon
from models.privacy.identity import generate_identity
from models.privacy.released_metrics import evaluation_ratios
from models.privacy.secagg_plus import RoundConfig, default_threshold
from models.privacy.secagg_plus_driver import run_round
from models.ranking.federated import RankingConfig, run_two_stage
from models.sites.budget import SITE_RUN_DELTA
from tasks.secure import round_threshold

EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0)
N_CLIENTS = 10
REPEATS = 5  # private runs per setting (their noise differs every time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="ml-1m", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--factors", type=int, default=8, help="secure-aggregation cost: k")
    parser.add_argument("--reg", type=float, default=0.08, help="secure-aggregation cost: reg")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implicit-factors", type=int, default=16)
    parser.add_argument("--implicit-reg", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=N_CLIENTS, help="iid clients (sites)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["implicit", "secure", "sites_delta"])  # fmt: skip
    args = parser.parse_args()
    keep_freed_memory()
    data = load_movielens(args.data)
    if data is None:
        return
    split = np.full(len(data), TRAIN, dtype=np.int8)
    split[next(KFold(5, shuffle=True, random_state=0).split(np.arange(len(data))))[1]] = TEST
    owner = assign_clients(
        data, n_clients=args.clients, strategy="iid", rng=np.random.default_rng(0)
    )
    clients = build_clients(data, owner, split)
    results: dict = {"args": vars(args), "machine": machine(), "n_clients": args.clients}
    results |= explicit_utility(clients, data)
    if "sites_delta" not in args.skip:
        results["sites_delta"] = sites_delta(clients, data)
    if "implicit" not in args.skip:
        results["dp_implicit"] = implicit_utility(data, args)
        print_table(results["dp_implicit"], ["epsilon", "shares", "noise_multiplier",
                                             "valid/ndcg_at_10", "test/ndcg_at_10", "seconds"])  # fmt: skip
    if "secure" not in args.skip:
        base = MFConfig(n_factors=args.factors, reg=args.reg, clip_to=data.rating_scale)
        overhead = secure_overhead(clients, data.n_items, base, args.repeats)
        print_table(overhead, ["mode", "seconds_per_round", "mb_per_client", "mb_per_round"])
        results["secure_aggregation"] = overhead
    sized = "" if args.clients == N_CLIENTS else f"_{args.clients}clients"
    path = write_json(f"privacy_{args.data}{sized}", results)
    print(f"wrote {path}")


def _test_rmse(clients, n_items: int, config: MFConfig, rounds: int) -> tuple[float, dict]:
    _, history = run_federated(clients, n_items, config, rounds=rounds, eval_splits=("test",),
                               eval_ranking=False)  # fmt: skip
    return history[-1].metrics["test/rmse"], history[-1].metrics


def private_run(clients, data, eps: float, *, secure: bool, **given) -> dict:
    """The explicit model ``fedrec train [--secure-aggregation] --dp-epsilon eps`` trains with
    the CLI's defaults (plus ``given`` fields), its noise shares those of the flow."""
    config = TrainingConfig(dp_epsilon=eps, secure_aggregation=secure,
                            clients=len(clients), **given)  # fmt: skip
    delta = config.dp_delta or 1.0 / data.n_users
    n = len(clients)
    shares = round_threshold(n, quorum(config, n)) if secure else 1  # as the flow's privacy plan
    # as the flow's privacy plan: the final evaluation is one more release (no champion yet)
    ratios = evaluation_ratios(champion=False)
    sigma = calibrate(eps, config.client_fraction, config.rounds, delta, relative=ratios)
    evaluation = [r * sigma for r in ratios]
    dp = UserLevelDP(sigma, config.dp_max_items, shares=shares)
    mf = replace(config.mf_config(), dp=dp)
    started = time.perf_counter()
    # the noise comes from OS entropy: every run differs, so the median of REPEATS runs
    rmses = [_test_rmse(clients, data.n_items, mf, config.rounds)[0] for _ in range(REPEATS)]
    spent = epsilon(sigma, config.client_fraction, config.rounds, delta, extra=evaluation)
    # the decoded sum of every client's share: sigma * sqrt(clients / shares) per unit sensitivity
    effective = sigma * math.sqrt(len(clients) / shares)
    return {"epsilon": eps, "secure_aggregation": secure, "delta": delta, "rounds": config.rounds,
            "factors": mf.n_factors, "max_items": config.dp_max_items, "shares": shares,
            "noise_multiplier": sigma, "sum_noise_multiplier": effective, "epsilon_spent": spent,
            "evaluation_noise_multiplier": evaluation[0],
            "test/rmse": float(np.median(rmses)), "test_rmse_sd": float(np.std(rmses, ddof=1)),
            "test_rmse_runs": rmses, "seconds": (time.perf_counter() - started) / REPEATS}  # fmt: skip


def bias_model_rmse(clients, n_items: int, scale: tuple[float, float], reg_items: float = 25.0,
                    reg_users: float = 10.0, iterations: int = 5) -> float:  # fmt: skip
    """Test RMSE of the non-private bias model ``mu + b_u + b_i`` (alternating ridge fits; each
    client's users are its own, item sums add up over clients)."""
    train = [c.rows("train") for c in clients]
    mu = sum(float(r.ratings.sum()) for r in train) / sum(len(r) for r in train)
    user_bias = [np.zeros(r.n_users) for r in train]
    item_bias = np.zeros(n_items)
    for _ in range(iterations):
        total, count = np.zeros(n_items), np.zeros(n_items)
        for r, bu in zip(train, user_bias, strict=True):
            total += np.bincount(r.items, r.ratings - mu - bu[r.users], minlength=n_items)
            count += np.bincount(r.items, minlength=n_items)
        item_bias = total / (count + reg_items)
        user_bias = [
            np.bincount(r.users, r.ratings - mu - item_bias[r.items], minlength=r.n_users)
            / (np.bincount(r.users, minlength=r.n_users) + reg_users)
            for r in train
        ]
    sse, n = 0.0, 0
    for c, bu in zip(clients, user_bias, strict=True):
        test = c.rows("test")
        predicted = np.clip(mu + bu[test.users] + item_bias[test.items], *scale)
        sse += float(((predicted - test.ratings) ** 2).sum())
        n += len(test)
    return math.sqrt(sse / n)


def explicit_utility(clients, data) -> dict:
    """Section 1: the private defaults at each epsilon, with and without secure aggregation, and
    the references of the same run."""
    plain = TrainingConfig(clients=len(clients))
    started = time.perf_counter()
    als, metrics = _test_rmse(clients, data.n_items, plain.mf_config(), plain.rounds)
    references = [
        {"model": f"non-private ALS (CLI defaults: k {plain.mf_config().n_factors}, "
                  f"{plain.rounds} rounds)", "test/rmse": als,
         "seconds": time.perf_counter() - started},
        {"model": "trivial baseline: global mean + item bias (the promotion gate's)",
         "test/rmse": metrics["baseline/test/rmse"]},
        {"model": "non-private bias model (mu + b_u + b_i)",
         "test/rmse": bias_model_rmse(clients, data.n_items, data.rating_scale)},
    ]  # fmt: skip
    print_table(references, ["model", "test/rmse", "seconds"])
    rows = []
    for secure in (True, False):
        for eps in EPSILONS:
            rows.append(private_run(clients, data, eps, secure=secure))
            print(f"  secure aggregation {secure}, epsilon {eps}: RMSE {rows[-1]['test/rmse']:.4f}",
                  flush=True)  # fmt: skip
    columns = ["epsilon", "secure_aggregation", "rounds", "shares", "noise_multiplier",
               "sum_noise_multiplier", "epsilon_spent", "test/rmse", "test_rmse_sd", "seconds"]  # fmt: skip
    print_table(rows, columns)
    factors = [private_run(clients, data, eps, secure=True, rounds=3) for eps in (8.0, 16.0)]
    print_table(factors, ["epsilon", "rounds", "factors", "shares", "test/rmse", "test_rmse_sd"])
    return {"explicit_references": references, "dp": rows, "dp_with_factors": factors}


def sites_delta(clients, data) -> list[dict]:
    """Section 4: what a run over real sites pays for calibrating at the sites' per-run delta
    (``SITE_RUN_DELTA``) instead of 1/users: no secure aggregation (each upload carries the full
    noise, as a site's does), the same epsilons, side by side in one run."""
    rows = []
    for eps in EPSILONS:
        for delta in (None, SITE_RUN_DELTA):  # None: the simulation's default, 1/users
            row = private_run(clients, data, eps, secure=False, dp_delta=delta)
            rows.append(row | {"delta_rule": "1/users" if delta is None else "sites' per-run"})
    print_table(rows, ["epsilon", "delta_rule", "delta", "noise_multiplier",
                       "sum_noise_multiplier", "test/rmse", "test_rmse_sd"])  # fmt: skip
    return rows


def implicit_utility(data, args: argparse.Namespace) -> list[dict]:
    """Implicit-ALS NDCG@10 at each epsilon (RecBole's protocol, ALS order, no re-ranker)."""
    positives = keep_positives(data, 3.0)
    split = recbole_split(positives, 0)
    owner = assign_clients(positives, n_clients=10, strategy="iid", rng=np.random.default_rng(0))
    clients = build_clients(positives, owner, split)
    delta = 1.0 / positives.n_users
    base = RankingConfig(n_factors=args.implicit_factors, reg=args.implicit_reg, ranker=None)
    rows = []
    for eps in (*EPSILONS, None):
        config, sigma, shares = base, None, None
        cli = TrainingConfig(feedback="implicit", clients=N_CLIENTS, dp_epsilon=eps,
                             secure_aggregation=eps is not None)  # fmt: skip
        if eps is not None:
            shares = round_threshold(len(clients), quorum(cli, len(clients)))
            ratios = evaluation_ratios(champion=False)
            sigma = calibrate(eps, cli.client_fraction, cli.rounds, delta, relative=ratios)
            config = replace(base, dp=UserLevelDP.for_implicit(sigma, cli.dp_max_items, shares))
        started = time.perf_counter()
        result = run_two_stage(clients, positives.n_items, config, rounds=cli.rounds,
                               eval_splits=("valid", "test"))  # fmt: skip
        final = result.history[-1]
        rows.append({"epsilon": "none" if eps is None else eps, "delta": delta, "rounds": cli.rounds,
                     "shares": shares, "noise_multiplier": sigma,
                     "valid/ndcg_at_10": final["valid/ndcg_at_10"], "test/ndcg_at_10": final["test/ndcg_at_10"],
                     "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"  implicit, epsilon {rows[-1]['epsilon']}: NDCG@10 {final['test/ndcg_at_10']:.4f}",
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
