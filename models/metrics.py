"""Rating and top-K metrics as sums, so clients can report them and the server can add them up.

A client returns :func:`rating_error_sums` and :func:`ranking_sums` over its own held-out rows;
:func:`add_sums` combines clients and :func:`finalize_metrics` turns sums into metrics. The same two
steps over all rows at once give the centralized numbers, which is what makes federated evaluation
exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import sparse

RANKING_KEYS = ("precision", "recall", "ndcg", "hit", "map")


def rating_error_sums(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Squared and absolute error sums and the row count."""
    err = np.asarray(predicted, dtype=np.float64) - np.asarray(actual, dtype=np.float64)
    return {"sse": float(err @ err), "sae": float(np.abs(err).sum()), "n": float(err.size)}


def ranking_sums(
    scores: np.ndarray, exclude: sparse.csr_matrix, relevant: sparse.csr_matrix, k: int
) -> tuple[dict[str, float], np.ndarray]:
    """Per-user top-K metrics, summed over users that have at least one relevant item.

    Parameters
    ----------
    scores : ndarray of shape (n_users, n_items)
        Higher is better.
    exclude : csr_matrix of shape (n_users, n_items)
        Items a user has already seen (their training rows): never recommended.
    relevant : csr_matrix of shape (n_users, n_items)
        Held-out items that count as hits.
    k : int

    Returns
    -------
    sums : dict
        ``precision``, ``recall``, ``ndcg``, ``hit``, ``map`` summed over evaluated users, and
        ``users``, their number.
    recommended : ndarray of shape (n_items,)
        How often each item was in a top-K list (for catalog coverage).
    """
    n_users, n_items = scores.shape
    recommended = np.zeros(n_items)
    sums = dict.fromkeys(RANKING_KEYS, 0.0) | {"users": 0.0}
    if n_users == 0 or n_items == 0:
        return sums, recommended
    k = min(k, n_items)
    masked = np.where(exclude.toarray() > 0, -np.inf, scores)
    top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(
        top, np.argsort(-np.take_along_axis(masked, top, 1), axis=1, kind="stable"), 1
    )
    valid = np.isfinite(np.take_along_axis(masked, top, 1))
    np.add.at(recommended, top[valid], 1.0)
    n_relevant = np.diff(relevant.indptr)
    evaluated = n_relevant > 0
    hits = (np.take_along_axis(relevant.toarray() > 0, top, 1) & valid)[evaluated]
    n_rel = n_relevant[evaluated].astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_rel, k).astype(int) - 1]
    cumulative_hits = np.cumsum(hits, axis=1)
    precision_at = cumulative_hits / np.arange(1, k + 1)
    sums["precision"] = float(hits.sum(axis=1).sum() / k)
    sums["recall"] = float((hits.sum(axis=1) / n_rel).sum())
    sums["ndcg"] = float(((hits @ discounts) / ideal).sum())
    sums["hit"] = float(hits.any(axis=1).sum())
    sums["map"] = float(((precision_at * hits).sum(axis=1) / np.minimum(n_rel, k)).sum())
    sums["users"] = float(evaluated.sum())
    return sums, recommended


def add_sums(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise sum of metric sums from several clients."""
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


def finalize_metrics(
    sums: Mapping[str, float], *, k: int, n_items: int | None = None
) -> dict[str, float]:
    """Turn sums into metrics: ``rmse``, ``mae``, ``precision_at_k`` ... and ``coverage_at_k`` (MLflow metric names allow no "@").

    Metrics whose denominator is zero are left out rather than reported as 0 or NaN. Each metric
    is kept within what exact sums can give: a ranking metric at most 1, MAE at most RMSE. Exact
    sums are never changed by that; sums released with DP noise may fall outside (an NDCG of
    1.07, an MAE above the RMSE), and moving them back is post-processing.
    """
    out: dict[str, float] = {}
    if sums.get("n", 0) > 0:
        out["rmse"] = float(np.sqrt(sums["sse"] / sums["n"]))
        out["mae"] = min(float(sums["sae"] / sums["n"]), out["rmse"])
    if sums.get("users", 0) > 0:
        for key in RANKING_KEYS:
            out[f"{key}_at_{k}"] = min(float(sums[key] / sums["users"]), 1.0)
    if n_items and "covered" in sums:
        out[f"coverage_at_{k}"] = float(sums["covered"] / n_items)
    return out


def distribution(values: Iterable[float]) -> dict[str, float]:
    """min, p10, median and max of a per-client metric."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {}
    return {
        "min": float(arr.min()),
        "p10": float(np.percentile(arr, 10)),
        "median": float(np.median(arr)),
        "max": float(arr.max()),
    }
