"""Federated evaluation: clients report metric sums, the server turns them into metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import sparse

from models.client import ClientData
from models.metrics import add_sums, distribution, finalize_metrics, ranking_sums
from models.promotion import BASELINE

# What a client reports for one split: metric sums, and per-item top-K counts (None without ranking).
Evaluation = tuple[dict[str, float], np.ndarray | None]


def metric_name(split: str, metric: str, client_stat: str | None = None) -> str:
    """The logged name of ``metric`` on ``split`` (``valid/rmse``), or of its spread over clients
    (``valid/client_max/rmse`` with ``client_stat="max"``)."""
    if client_stat is None:
        return f"{split}/{metric}"
    return f"{split}/client_{client_stat}/{metric}"


def summarize_evaluation(
    parts: Sequence[Evaluation], top_k: int, n_items: int, prefix: str, *, spread: bool = True
) -> dict[str, float]:
    """Combine clients' evaluation sums into global metrics plus, with ``spread``, the per-client
    spread (min, p10, median, max) of RMSE, MAE, NDCG, recall and MAP. Names are grouped by
    ``/`` as MLflow's charts are: ``<prefix>/rmse`` is the global RMSE, ``<prefix>/client_max/rmse``
    the worst client's (:func:`metric_name`). Without ``spread`` (each client's sums a noisy DP
    release: one client's figure would be mostly noise) only the global metrics."""
    sums = add_sums(p for p, _ in parts)
    recommended = [r for _, r in parts if r is not None]
    if recommended:
        sums["covered"] = float((np.sum(recommended, axis=0) > 0).sum())
    k = top_k
    out = {
        metric_name(prefix, name): v
        for name, v in finalize_metrics(sums, k=k, n_items=n_items).items()
    }
    if not spread:
        return out
    per_client = [finalize_metrics(p, k=k) for p, _ in parts]
    for metric in ("rmse", "mae", f"ndcg_at_{k}", f"recall_at_{k}", f"map_at_{k}"):
        values = [m[metric] for m in per_client if metric in m]
        out |= {metric_name(prefix, metric, stat): v for stat, v in distribution(values).items()}
    return out


def without_item_counts(evaluations: Mapping[str, Evaluation]) -> dict[str, Evaluation]:
    """The evaluations without their per-item top-K counts: what a private client sends (which
    items it recommended to its users is not part of what DP counts)."""
    return {split: (sums, None) for split, (sums, _) in evaluations.items()}


def summarize_splits(
    evaluations: Sequence[Mapping[str, Evaluation]],
    top_k: int,
    n_items: int,
    *,
    spread: bool = True,
) -> dict[str, float]:
    """:func:`summarize_evaluation` for every split the clients reported, prefixed by the split."""
    metrics: dict[str, float] = {}
    for split in dict.fromkeys(s for e in evaluations for s in e):
        parts = [e[split] for e in evaluations if split in e]
        metrics |= summarize_evaluation(parts, top_k, n_items, split, spread=spread)
    return metrics


def exclude_seen(client: ClientData, split: str) -> sparse.csr_matrix:
    """What a user has already seen when ``split`` is ranked: training rows, and for the test
    split the validation rows too."""
    exclude = client.matrix("train")
    return exclude + client.matrix("valid") if split == "test" else exclude


def ranking_evaluation(
    client: ClientData, split: str, users: np.ndarray, scores: np.ndarray, k: int
) -> Evaluation:
    """Top-``k`` ranking sums of ``scores`` (one row per user of ``users``) on a split."""
    relevant = client.matrix(split)[users]
    return ranking_sums(scores, exclude_seen(client, split)[users], relevant, k)


def evaluate_scores(
    client: ClientData, split: str, k: int, score: Callable[[np.ndarray], np.ndarray]
) -> Evaluation:
    """Ranking sums of any scorer (local user indices -> (users, n_items) scores) on a split."""
    relevant = client.matrix(split)
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    return ranking_evaluation(client, split, users, score(users), k)


def popularity_scores(popularity: np.ndarray, n_users: int) -> np.ndarray:
    """Scores of the most-popular list for ``n_users`` users: every row ranks the items by
    ``popularity``, ties broken towards the lower item index (scores ``n_items`` down to 1), so
    the list does not depend on how a sort orders equal counts."""
    popularity = np.asarray(popularity, dtype=np.float64)
    n_items = popularity.size
    scores = np.empty(n_items)
    scores[np.argsort(-popularity, kind="stable")] = np.arange(n_items, 0, -1, dtype=np.float64)
    return np.broadcast_to(scores, (n_users, n_items))


def popularity_evaluation(
    client: ClientData,
    split: str,
    popularity: np.ndarray,
    k: int,
    users: np.ndarray | None = None,
) -> Evaluation:
    """Ranking sums of the most-popular list (:func:`popularity_scores`) on a split, with the
    exclusions of :func:`exclude_seen`: the users with held-out rows (or ``users``, the local
    indices a candidate was evaluated on), as :func:`evaluate_scores` evaluates a model."""
    if users is None:
        return evaluate_scores(client, split, k, lambda u: popularity_scores(popularity, len(u)))
    return ranking_evaluation(client, split, users, popularity_scores(popularity, len(users)), k)


def popularity_baselines(
    client: ClientData,
    popularity: np.ndarray | None,
    splits: Iterable[str],
    k: int,
    users: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Evaluation]:
    """The trivial baseline of a ranking model, ``baseline/<split>`` for each held-out split: the
    most-popular list from ``popularity``, the per-item counts the server already holds (the
    model's own, noisy under DP), evaluated on the same rows as the model (``users[split]`` when
    given). Empty when there are no counts yet (``popularity`` None)."""
    if popularity is None:
        return {}
    return {
        f"{BASELINE}/{split}": popularity_evaluation(
            client, split, popularity, k, None if users is None else users.get(split)
        )
        for split in splits
        if split != "train"
    }
