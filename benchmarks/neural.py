"""The neural model (Mult-DAE / Mult-VAE) on ML-1M, trained centrally and by FedAvg.

Protocol (RecBole's, as in ``benchmarks/ranking.py``): ratings >= 3 are positives, each user's
positives shuffled and split 8:1:1 (RecBole's rounding); full ranking over every item not in the
user's training rows (test also excludes the validation items); the network reads the user's
training rows; K = 10; Recall@10, NDCG@10 and Hit@10 over users with a held-out item.
``--core 10`` first keeps users and items with at least 10 positives (repeated until stable),
as RecBole's published ML-1M table does.

The same network and the same budget of data epochs is trained three ways: centrally, and by
FedAvg over ``--clients`` clients (users sharded iid, and by taste with Dirichlet(0.3)), each
client running ``--local-epochs`` epochs of Adam per round. Every ``--eval-every`` epochs the
model is scored on the validation rows; the test figures are those of the best validation
epoch (early stopping on validation NDCG@10). "seconds" is training time only.

    uv run python -m benchmarks.neural                    # ML-1M
    uv run python -m benchmarks.neural --core 10          # the 10-core variant
    uv run python -m benchmarks.neural --kind dae --latent 200 --hidden
    uv run python -m benchmarks.neural --epoch-timing     # seconds per epoch only
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pandas as pd
from scipy import sparse
from threadpoolctl import threadpool_limits

from benchmarks.common import (
    HelpFormatter,
    load_movielens,
    machine,
    peak_rss_mb,
    print_table,
    write_json,
)
from benchmarks.ranking import recbole_split
from models.data.schema import ITEM, USER, Interactions, keep_positives
from models.data.sharding import assign_clients
from models.metrics import add_sums, finalize_metrics, ranking_sums
from models.neural.federated import FederatedConfig, run_federated
from models.neural.network import Architecture, Params, init_params, logits
from models.neural.training import TrainConfig, train_epochs

K = 10
# RecBole's published ML-1M figures (10-core, ratings >= 3, 8:1:1, full ranking), NDCG@10.
RECBOLE_NDCG = {"MultiDAE": 0.2425, "MultiVAE": 0.2523, "EASE": 0.2865}


def k_core(data: Interactions, k: int) -> Interactions:
    """Users and items with at least ``k`` rows, filtered repeatedly until both hold; ids re-indexed."""
    frame = data.frame
    while True:
        users = frame[USER].map(frame[USER].value_counts()) >= k
        items = frame[ITEM].map(frame[ITEM].value_counts()) >= k
        if bool(users.all() and items.all()):
            break
        frame = frame[users & items]
    user_codes, user_index = pd.factorize(frame[USER], sort=True)
    item_codes, item_index = pd.factorize(frame[ITEM], sort=True)
    frame = frame.assign(user=user_codes.astype(np.int32), item=item_codes.astype(np.int32))
    return Interactions(
        frame.reset_index(drop=True),
        data.user_ids[np.asarray(user_index)],
        data.item_ids[np.asarray(item_index)],
        data.rating_scale,
        source=f"{data.source} ({k}-core)",
    )


def split_matrices(data: Interactions, split: np.ndarray) -> dict[str, sparse.csr_matrix]:
    """Users x items indicator matrix of each split (0 train, 1 valid, 2 test)."""
    users, items = data.frame[USER].to_numpy(), data.frame[ITEM].to_numpy()
    out = {}
    for name, code in (("train", 0), ("valid", 1), ("test", 2)):
        keep = split == code
        out[name] = sparse.csr_matrix(
            (np.ones(int(keep.sum()), np.float32), (users[keep], items[keep])),
            shape=(data.n_users, data.n_items),
        )
    return out


def evaluate(
    params: Params, arch: Architecture, matrices: dict[str, sparse.csr_matrix], split: str
) -> dict[str, float]:
    """Recall, NDCG and Hit at K on one held-out split, every item ranked."""
    train, relevant = matrices["train"], matrices[split]
    exclude = train + matrices["valid"] if split == "test" else train
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    parts = []
    for lo in range(0, users.size, 1000):
        chunk = users[lo : lo + 1000]
        scores = logits(params, arch, train[chunk])
        parts.append(ranking_sums(scores, exclude[chunk], relevant[chunk], K)[0])
    out = finalize_metrics(add_sums(parts), k=K)
    return {"recall": out[f"recall_at_{K}"], "ndcg": out[f"ndcg_at_{K}"], "hit": out[f"hit_at_{K}"]}


class Tracker:
    """Keeps the best validation state seen so far, and the training time apart from evaluation."""

    def __init__(
        self, arch: Architecture, matrices: dict[str, sparse.csr_matrix], every: int
    ) -> None:
        self.arch, self.matrices, self.every = arch, matrices, every
        self.best_ndcg, self.best_epoch, self.best_params = -1.0, 0, None
        self.curve: list[tuple[int, float]] = []
        self.eval_seconds = 0.0

    def __call__(self, epoch: int, params: Params, last: bool) -> None:
        if epoch % self.every and not last:
            return
        started = time.perf_counter()
        ndcg = evaluate(params, self.arch, self.matrices, "valid")["ndcg"]
        self.curve.append((epoch, ndcg))
        print(f"    epoch {epoch}: valid NDCG@10 {ndcg:.4f}", flush=True)
        if ndcg > self.best_ndcg:
            self.best_ndcg, self.best_epoch = ndcg, epoch
            self.best_params = {k: v.copy() for k, v in params.items()}
        self.eval_seconds += time.perf_counter() - started

    def result(self, method: str, seconds: float, **extra: object) -> dict:
        assert self.best_params is not None
        test = evaluate(self.best_params, self.arch, self.matrices, "test")
        return {
            "method": method,
            **test,
            "valid_ndcg": self.best_ndcg,
            "best_epoch": self.best_epoch,
            "seconds": seconds,
            "curve": self.curve,
            **extra,
        }


def run_central(
    arch: Architecture,
    matrices: dict[str, sparse.csr_matrix],
    config: TrainConfig,
    args: argparse.Namespace,
) -> dict:
    tracker = Tracker(arch, matrices, args.eval_every)
    params = init_params(arch, np.random.default_rng(args.seed))
    started = time.perf_counter()
    train_epochs(
        params,
        arch,
        matrices["train"],
        config,
        epochs=args.epochs,
        rng=np.random.default_rng(args.seed + 1),
        on_epoch=lambda s, p: tracker(s.epoch, p, s.epoch == args.epochs),
    )
    seconds = time.perf_counter() - started - tracker.eval_seconds
    return tracker.result("centralized", seconds, seconds_per_epoch=seconds / args.epochs)


def run_fed(
    method: str,
    arch: Architecture,
    data: Interactions,
    matrices: dict[str, sparse.csr_matrix],
    config: TrainConfig,
    federated: FederatedConfig,
    strategy: str,
    args: argparse.Namespace,
) -> dict:
    owner = assign_clients(
        data, n_clients=args.clients, strategy=strategy, rng=np.random.default_rng(args.seed)
    )  # type: ignore[arg-type]
    histories = [matrices["train"][np.flatnonzero(owner == c)] for c in range(args.clients)]
    tracker = Tracker(arch, matrices, args.eval_every)
    params = init_params(arch, np.random.default_rng(args.seed))
    upload = [0]

    def on_round(stats, p) -> None:
        upload[0] = stats.upload_bytes
        tracker(stats.epochs, p, stats.round == federated.rounds)

    started = time.perf_counter()
    run_federated(params, arch, histories, config, federated, seed=args.seed + 1, on_round=on_round)
    seconds = time.perf_counter() - started - tracker.eval_seconds
    sizes = np.bincount(owner, minlength=args.clients)
    return tracker.result(
        method,
        seconds,
        seconds_per_round=seconds / max(1, federated.rounds),
        upload_mb_per_round=upload[0] / 1e6,
        client_users_min_max=[int(sizes.min()), int(sizes.max())],
    )


def epoch_timing(arch: Architecture, train: sparse.csr_matrix, config: TrainConfig, repeats: int):
    """Seconds of one centralized epoch (after a warm-up epoch), median of ``repeats``."""
    rng = np.random.default_rng(0)
    params, optimizer, _ = train_epochs(
        init_params(arch, rng), arch, train, config, epochs=1, rng=rng
    )
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        params, optimizer, _ = train_epochs(
            params, arch, train, config, epochs=1, rng=rng, optimizer=optimizer
        )
        times.append(time.perf_counter() - started)
    return float(np.median(times)), times


def sklearn_check(train: sparse.csr_matrix) -> dict[str, object]:
    """What scikit-learn's MLPClassifier does with multi-hot targets, and one epoch's time."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    targets = train.toarray() > 0
    model = MLPClassifier(
        hidden_layer_sizes=(600, 200, 600),
        activation="tanh",
        max_iter=1,
        batch_size=500,
        random_state=0,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train, targets)
    return {
        "out_activation": model.out_activation_,
        "loss": "binary log-loss per item" if model.out_activation_ == "logistic" else "?",
        "epoch_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="ml-1m", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--core", type=int, default=0, help="k-core filter (0: none)")
    parser.add_argument("--kind", default="vae", choices=["dae", "vae"])
    parser.add_argument("--hidden", type=int, nargs="*", default=[600])
    parser.add_argument("--latent", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=60, help="data epochs, every method")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--server-rule", default="fedavg", choices=["fedavg", "fedadam"])
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument(
        "--client-batch-size",
        type=int,
        default=None,
        help="clients' minibatch (default: --batch-size)",
    )
    parser.add_argument("--dropout", type=float, default=TrainConfig.dropout)
    parser.add_argument("--beta-cap", type=float, default=TrainConfig.beta_cap)
    parser.add_argument("--anneal-epochs", type=float, default=TrainConfig.anneal_epochs)
    parser.add_argument("--l2", type=float, default=TrainConfig.l2)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=["central", "iid", "dirichlet"])
    parser.add_argument("--epoch-timing", action="store_true")
    parser.add_argument("--sklearn", action="store_true", help="also try MLPClassifier")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads (1 is fastest on a busy 2-core machine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    with threadpool_limits(limits=args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    raw = load_movielens(args.data)
    if raw is None:
        return
    data = keep_positives(raw, 3.0)
    if args.core:
        data = k_core(data, args.core)
    matrices = split_matrices(data, recbole_split(data, args.seed))
    arch = Architecture(data.n_items, args.kind, tuple(args.hidden), args.latent)
    config = TrainConfig(
        learning_rate=args.lr,
        batch_size=args.batch_size,
        dropout=args.dropout,
        beta_cap=args.beta_cap,
        anneal_epochs=args.anneal_epochs,
        l2=args.l2,
    )
    client_config = TrainConfig(
        **{**asdict(config), "batch_size": args.client_batch_size or args.batch_size}
    )
    print(
        f"{args.data}{f' {args.core}-core' if args.core else ''}: {matrices['train'].nnz} train / "
        f"{matrices['valid'].nnz} valid / {matrices['test'].nnz} test positives, {data.n_users} "
        f"users, {data.n_items} items; {arch}",
        flush=True,
    )
    payload: dict[str, object] = {"args": vars(args), "machine": machine()}
    if args.epoch_timing:
        seconds, times = epoch_timing(arch, matrices["train"], config, repeats=3)
        print(f"one centralized epoch: {seconds:.2f} s (median of {times})")
        payload["epoch_seconds"] = seconds
        if args.sklearn:
            payload["sklearn"] = sklearn_check(matrices["train"])
            print(f"sklearn MLPClassifier: {payload['sklearn']}")
        return
    federated = FederatedConfig(
        rounds=args.epochs // args.local_epochs,
        local_epochs=args.local_epochs,
        server_rule=args.server_rule,
        server_lr=args.server_lr,
    )
    runners: dict[str, Callable[[], dict]] = {
        "central": lambda: run_central(arch, matrices, config, args),
        "iid": lambda: run_fed(
            f"FedAvg, {args.clients} clients iid",
            arch,
            data,
            matrices,
            client_config,
            federated,
            "iid",
            args,
        ),
        "dirichlet": lambda: run_fed(
            f"FedAvg, {args.clients} clients Dirichlet 0.3",
            arch,
            data,
            matrices,
            client_config,
            federated,
            "dirichlet",
            args,
        ),
    }
    rows = []
    for name in args.methods:
        rows.append(runners[name]())
        r = rows[-1]
        print(
            f"  {r['method']}: test NDCG@10 {r['ndcg']:.4f} (valid {r['valid_ndcg']:.4f} at "
            f"epoch {r['best_epoch']}), {r['seconds']:.0f} s",
            flush=True,
        )
    central = next((r for r in rows if r["method"] == "centralized"), None)
    for r in rows:
        r["ndcg_vs_central"] = (r["ndcg"] / central["ndcg"] - 1) if central else None
    print_table(
        rows,
        [
            "method",
            "recall",
            "ndcg",
            "hit",
            "valid_ndcg",
            "best_epoch",
            "seconds",
            "ndcg_vs_central",
        ],
    )
    payload |= {"rows": rows, "recbole_ndcg": RECBOLE_NDCG, "peak_rss_mb": peak_rss_mb()}
    name = f"neural_{args.data}" + (f"-{args.core}core" if args.core else "")
    name += f"_{args.tag.lstrip('_')}" if args.tag else ""
    print(f"wrote {write_json(name, payload)}")


if __name__ == "__main__":
    main()
