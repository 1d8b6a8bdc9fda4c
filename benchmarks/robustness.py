"""Poisoned updates: FedAvg's test RMSE on ML-100K with 0%, 10% and 20% malicious clients, under
plain averaging and each robust aggregation rule.

Protocol: ML-100K, users sharded into 10 iid clients (a permutation drawn from the seed), each
row held out as validation or test by its keyed hash (80/10/10), FedAvg (k = 32, 5 local epochs,
lr 0.03, batch 256) for ``--rounds`` rounds; the attackers are a choice of clients drawn from the
seed and send, instead of their update, ``-5 x`` it (sign_flip), ``20 x`` it (scale) or Gaussian
noise with 20 x its spread (random). Reported: the final round's test RMSE and its change
relative to the clean run of the same seed under plain averaging.

    uv run python -m benchmarks.robustness                      # every attack, rule and fraction
    uv run python -m benchmarks.robustness --seeds 1 2 --fractions 0 0.2 --out robustness_seeds
    uv run python -m benchmarks.robustness --attacks sign_flip --rounds 10
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from benchmarks.common import HelpFormatter, load_movielens, machine, print_table, write_json
from fedrec.runtime import keep_freed_memory
from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.mf.federated import MFConfig, run_federated
from models.robust import choose_attackers

RULES = ("mean", "median", "trimmed_mean", "norm_clip", "screened_mean")
STRENGTH = {"sign_flip": 5.0, "scale": 20.0, "random": 20.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="ml-100k", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--attacks", nargs="+", default=list(STRENGTH), choices=list(STRENGTH))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.1, 0.2])
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="partition and attacker seeds"
    )
    parser.add_argument("--out", default=None, help="JSON name (default robustness_<data>)")
    args = parser.parse_args()
    keep_freed_memory()
    data = load_movielens(args.data)
    if data is None:
        return
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    base = MFConfig(algorithm="fedavg", clip_to=data.rating_scale)
    rows = []
    for seed in args.seeds:
        owner = assign_clients(
            data, n_clients=args.clients, strategy="iid", rng=np.random.default_rng(seed)
        )
        clients = build_clients(data, owner, split)
        clean: float | None = None
        for attack in args.attacks:
            for fraction in args.fractions:
                if fraction == 0 and attack != args.attacks[0]:
                    continue  # the clean runs do not depend on the attack
                for rule in RULES:
                    config = replace(
                        base, aggregation=rule, attack="none" if fraction == 0 else attack,
                        attack_clients=choose_attackers(args.clients, fraction, seed),
                        attack_scale=STRENGTH[attack],
                    )  # fmt: skip
                    started = time.perf_counter()
                    _, history = run_federated(clients, data.n_items, config, rounds=args.rounds,
                                               eval_splits=("test",), eval_ranking=False)  # fmt: skip
                    rmse = history[-1].metrics["test/rmse"]
                    if fraction == 0 and rule == "mean":
                        clean = rmse
                    rows.append({"seed": seed, "attack": "none" if fraction == 0 else attack,
                                 "malicious": f"{fraction:.0%}", "rule": rule, "test/rmse": rmse,
                                 "vs_clean": rmse / clean - 1 if clean else float("nan"),
                                 "seconds": time.perf_counter() - started})  # fmt: skip
                    print(
                        f"  seed {seed} {rows[-1]['attack']:9s} {rows[-1]['malicious']:>4s} "
                        f"{rule:12s} RMSE {rmse:.4f}",
                        flush=True,
                    )
    print_table(rows, ["seed", "attack", "malicious", "rule", "test/rmse", "vs_clean", "seconds"])
    path = write_json(
        args.out or f"robustness_{args.data}",
        {"args": vars(args), "machine": machine(), "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
