"""Rating-prediction quality of centralized vs federated MF on MovieLens (Surprise's protocol).

Protocol: 5 random folds over ratings (``KFold(5, shuffle=True, random_state=0)``); the users of
the data are sharded into ``--clients`` clients (iid, or Dirichlet non-IID with alpha 0.3); each
fold's test ratings go to the client that owns the user. RMSE and MAE are on the test fold, with
predictions clipped to the rating scale. Every (dataset, method, fold) runs in a fresh process, so
its peak memory is its own.

    uv run python -m benchmarks.quality                      # both datasets, 5 folds, all methods
    uv run python -m benchmarks.quality --datasets ml-100k --folds 1
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from sklearn.model_selection import KFold

from benchmarks.common import (
    HelpFormatter,
    load_movielens,
    machine,
    median,
    peak_rss_mb,
    print_table,
    write_json,
)
from fedrec.runtime import keep_freed_memory
from models.client import TEST, TRAIN
from models.data.partitions import build_clients
from models.data.sharding import assign_clients
from models.metrics import finalize_metrics, rating_error_sums
from models.mf.als import CentralizedALS, RatingRows
from models.mf.federated import MFConfig, run_federated

METHODS = ("central-als", "fed-als-iid", "fed-als-dirichlet", "fedavg", "fedadam")
# Weighted-lambda ridge per dataset, chosen once on an 80/20 split with a small grid (k in 32, 64;
# reg in 0.05..0.2): see the README. Everything else is MFConfig's default.
REG = {"ml-100k": 0.12, "ml-1m": 0.08}


def _split(n_rows: int, fold: int) -> np.ndarray:
    folds = list(KFold(n_splits=5, shuffle=True, random_state=0).split(np.arange(n_rows)))
    split = np.full(n_rows, TRAIN, dtype=np.int8)
    split[folds[fold][1]] = TEST
    return split


def run_one(dataset: str, method: str, fold: int, args: dict) -> dict:
    """One (dataset, method, fold) measurement; runs in its own process."""
    keep_freed_memory()
    data = load_movielens(dataset)
    assert data is not None
    split = _split(len(data), fold)
    clip = data.rating_scale
    reg = REG[dataset]
    record = {
        "dataset": dataset,
        "method": method,
        "fold": fold,
        "factors": args["factors"],
        "reg": reg,
    }
    frame = data.frame
    if method == "central-als":
        train = split == TRAIN
        rows = RatingRows(
            frame["user"].to_numpy()[train],
            frame["item"].to_numpy()[train],
            frame["rating"].to_numpy()[train],
            n_users=data.n_users,
            n_items=data.n_items,
        )
        started = time.perf_counter()
        model = CentralizedALS(
            n_factors=args["factors"], reg=reg, n_iter=args["als_rounds"], seed=fold
        ).fit(rows)
        seconds = time.perf_counter() - started
        test = ~train
        predicted = np.clip(
            model.predict(frame["user"].to_numpy()[test], frame["item"].to_numpy()[test]), *clip
        )
        metrics = finalize_metrics(
            rating_error_sums(predicted, frame["rating"].to_numpy()[test]), k=10
        )
        record |= {
            "rounds": args["als_rounds"],
            "seconds_per_round": seconds / args["als_rounds"],
            "train_seconds": seconds,
            "rmse": metrics["rmse"],
            "mae": metrics["mae"],
            "rmse_curve": [],
            "upload_mb_per_round": 0.0,
        }
    else:
        strategy = "dirichlet" if method.endswith("dirichlet") else "iid"
        algorithm = "als" if method.startswith("fed-als") else method
        client_of_user = assign_clients(
            data,
            n_clients=args["clients"],
            strategy=strategy,
            alpha=0.3,
            rng=np.random.default_rng(fold),
        )
        clients = build_clients(data, client_of_user, split)
        config = MFConfig(algorithm=algorithm, n_factors=args["factors"], reg=reg, clip_to=clip)
        rounds = args["als_rounds"] if algorithm == "als" else args["sgd_rounds"]
        _, history = run_federated(
            clients,
            data.n_items,
            config,
            rounds=rounds,
            seed=fold,
            eval_splits=("test",),
            eval_ranking=False,
        )
        record |= {
            "strategy": strategy,
            "rounds": rounds,
            "seconds_per_round": median([h.seconds for h in history]),
            "round_seconds": [h.seconds for h in history],
            "train_seconds": sum(h.seconds for h in history),
            "rmse": history[-1].metrics["test/rmse"],
            "mae": history[-1].metrics["test/mae"],
            "rmse_curve": [h.metrics["test/rmse"] for h in history],
            "upload_mb_per_round": history[-1].upload_bytes / 1e6,
        }
    record["peak_rss_mb"] = peak_rss_mb()
    return record


def summarize(records: list[dict]) -> list[dict]:
    """Mean over folds per (dataset, method), plus rounds needed to come within 1% of central ALS."""
    central = {
        (r["dataset"], r["fold"]): r["rmse"] for r in records if r["method"] == "central-als"
    }
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for method in METHODS:
            runs = [r for r in records if r["dataset"] == dataset and r["method"] == method]
            if not runs:
                continue
            to_one_percent = []
            for r in runs:
                ref = central.get((dataset, r["fold"]))
                hit = [
                    i + 1
                    for i, v in enumerate(r["rmse_curve"])
                    if ref is not None and v <= 1.01 * ref
                ]
                to_one_percent.append(hit[0] if hit else None)
            reached = [t for t in to_one_percent if t is not None]
            rmse = [r["rmse"] for r in runs]
            gap = [
                r["rmse"] - central[(dataset, r["fold"])]
                for r in runs
                if (dataset, r["fold"]) in central
            ]
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "folds": len(runs),
                    "rmse": float(np.mean(rmse)),
                    "rmse_std": float(np.std(rmse)),
                    "mae": float(np.mean([r["mae"] for r in runs])),
                    "gap_to_central": float(np.mean(gap)) if gap else None,
                    "rounds": runs[0]["rounds"],
                    "rounds_to_1pct": int(median(reached))
                    if len(reached) == len(runs) and runs[0]["rmse_curve"]
                    else None,
                    "s_per_round": median([r["seconds_per_round"] for r in runs]),
                    "total_s": float(np.mean([r["train_seconds"] for r in runs])),
                    "upload_mb_round": runs[0]["upload_mb_per_round"],
                    "peak_mb": max(r["peak_rss_mb"] for r in runs),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--datasets", default="ml-100k,ml-1m", help="comma-separated: ml-100k, ml-1m"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="how many of the 5 folds to run (first N)"
    )
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument(
        "--als-rounds", type=int, default=15, help="ALS sweeps (central) and rounds (federated)"
    )
    parser.add_argument("--sgd-rounds", type=int, default=50, help="rounds of FedAvg and FedAdam")
    parser.add_argument("--out", default="quality", help="results/<OUT>.json")
    ns = parser.parse_args()
    args = {
        "factors": ns.factors,
        "clients": ns.clients,
        "als_rounds": ns.als_rounds,
        "sgd_rounds": ns.sgd_rounds,
    }
    jobs = []
    for dataset in ns.datasets.split(","):
        if load_movielens(dataset) is None:
            continue
        jobs += [(dataset, m, f) for m in ns.methods.split(",") for f in range(ns.folds)]
    if not jobs:
        raise SystemExit("nothing to run: no requested dataset was found (see the messages above)")
    records = []
    started = time.perf_counter()
    for dataset, method, fold in jobs:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            record = pool.submit(run_one, dataset, method, fold, args).result()
        records.append(record)
        print(
            f"[{time.perf_counter() - started:7.1f}s] {dataset} {method:18s} fold {fold}: "
            f"RMSE {record['rmse']:.4f}  MAE {record['mae']:.4f}  {record['seconds_per_round']:.2f} s/round  "
            f"peak {record['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    summary = summarize(records)
    print()
    print_table(
        summary,
        [
            "dataset",
            "method",
            "folds",
            "rmse",
            "rmse_std",
            "mae",
            "gap_to_central",
            "rounds",
            "rounds_to_1pct",
            "s_per_round",
            "total_s",
            "upload_mb_round",
            "peak_mb",
        ],
    )
    path = write_json(
        ns.out, {"machine": machine(), "args": vars(ns), "summary": summary, "runs": records}
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
