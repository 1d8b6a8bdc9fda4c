"""Seconds per round of every model family through the single reference loop, on ML-1M with 10
clients (iid), in one run: explicit MF (ALS), the two-stage family's phases (implicit ALS rounds,
the item co-occurrence round, re-ranker rounds) and the neural network (one local epoch).

Each round's time covers the clients' computations and the server step, one after another in
this process (no evaluation, no orchestration): the work a round asks of the federation. Medians
over the rounds of each phase after its first; with ``--repeats N`` every family runs N times in
turn and the table gives the medians over the N runs (each run's figures are in the JSON).

    uv run python -m benchmarks.families [--data ml-1m] [--rounds 4] [--clients 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from benchmarks.common import (
    HelpFormatter,
    load_movielens,
    machine,
    median,
    peak_rss_mb,
    print_table,
    write_json,
)


def _timed_family(family, clients, n_items: int, rounds: int) -> list[dict]:
    """Run ``family`` for ``rounds`` sampled rounds, timing every round of every phase."""
    from models.federation.loop import EVERYONE_ROUND
    from models.federation.sampling import round_rng

    state = family.initial_state(n_items, 0)
    rows, step = [], 0
    for phase in family.phases(rounds):
        seconds, sent = [], []
        for _ in range(phase.rounds):
            step += 0 if phase.everyone else 1
            stream = EVERYONE_ROUND if phase.everyone else step
            started = time.perf_counter()
            updates = [
                family.client_round(
                    c, state, phase.name, round_rng(0, stream, c.client_id, private=False), ()
                )[0]
                for c in clients
            ]
            state = family.server_update(state, updates, phase.name)
            seconds.append(time.perf_counter() - started)
            sent.append(sum(u.nbytes() for u in updates) / len(updates))
        rows.append({
            "family": family.name, "phase": phase.name, "rounds": phase.rounds,
            "first_round_s": seconds[0],
            "median_round_s": median(seconds[1:]) if len(seconds) > 1 else seconds[0],
            "mb_per_client": median(sent) / 1e6,
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="ml-1m")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every family, in turn")
    args = parser.parse_args()

    from fedrec.config import TrainingConfig
    from models.data.partitions import build_clients
    from models.data.schema import keep_positives
    from models.data.sharding import assign_clients, split_rows
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig
    from models.neural.family import Neural, NeuralConfig
    from models.neural.training import TrainConfig
    from models.ranking.family import TwoStage, forget_ranker_data

    # fedrec train --feedback implicit --ranker lightgbm's settings (EASE, ADMM SLIM, XE-NDCG)
    two_stage = TrainingConfig(feedback="implicit", ranker="lightgbm").ranking_config()
    two_stage = replace(two_stage, ranker=replace(two_stage.ranker, rounds=args.rounds))
    data = load_movielens(args.data)
    if data is None:
        return
    positives = keep_positives(data, 3.0)
    families = [
        (data, ExplicitMF(MFConfig(n_factors=32))),
        (positives, TwoStage(two_stage)),
        (positives, Neural(NeuralConfig(kind="dae", hidden=(),
                                        train=TrainConfig(learning_rate=3e-3, batch_size=100)))),
    ]  # fmt: skip
    runs = []
    for repeat in range(args.repeats):
        rows = []
        for interactions, family in families:
            forget_ranker_data()  # each run builds its clients and their caches anew
            rng = np.random.default_rng(0)
            owner = assign_clients(interactions, n_clients=args.clients, strategy="iid", rng=rng)
            split = split_rows(interactions, method="random", valid_fraction=0.1, test_fraction=0.1)  # fmt: skip
            clients = build_clients(interactions, owner, split)
            rows += _timed_family(family, clients, interactions.n_items, args.rounds)
            print(f"run {repeat + 1}/{args.repeats}, {family.name}: done, peak "
                  f"{peak_rss_mb():.0f} MB", flush=True)  # fmt: skip
        runs.append(rows)
    rows = [
        {**first} | {key: median([run[i][key] for run in runs])
                     for key in ("first_round_s", "median_round_s", "mb_per_client")}
        for i, first in enumerate(runs[0])
    ]  # fmt: skip
    columns = ["family", "phase", "rounds", "first_round_s", "median_round_s", "mb_per_client"]
    print_table(rows, columns)
    path = write_json(
        f"families_{args.data}",
        {"args": vars(args), "machine": machine(), "rows": rows, "runs": runs},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
