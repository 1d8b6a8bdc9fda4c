"""Serving-side MF: fold a user's history into user parameters, then score or rank items.

These are what the registered model runs for each request; they need only the global item
parameters and the request's own history.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.mf.als import RatingRows, UserParams, solve_users
from models.mf.params import ItemParams


def fold_in(
    histories: Sequence[tuple[np.ndarray, np.ndarray]], params: ItemParams, *, reg: float
) -> UserParams:
    """Closed-form user parameters for each history of (item indices, ratings), all at once.

    An empty history gives zero factors and bias: the user is scored by ``mu + b_i``.
    """
    users = np.concatenate(
        [np.full(len(items), u) for u, (items, _) in enumerate(histories)] or [[]]
    )
    items = np.concatenate([np.asarray(i) for i, _ in histories] or [[]])
    ratings = np.concatenate([np.asarray(r, dtype=np.float64) for _, r in histories] or [[]])
    rows = RatingRows(
        users.astype(np.int64),
        items.astype(np.int64),
        ratings,
        n_users=len(histories),
        n_items=params.n_items,
    )
    return solve_users(rows, params, reg=reg)


def score_all(user_params: UserParams, params: ItemParams) -> np.ndarray:
    """Predicted rating of every item for every user: (n_users, n_items)."""
    return (
        params.global_mean
        + user_params.bias[:, None]
        + params.bias[None, :]
        + user_params.factors @ params.factors.T
    )


def top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items of one score vector, best first, never an excluded item.

    Returns indices and scores; fewer than ``k`` when the catalogue minus exclusions is smaller.
    """
    masked = scores.astype(np.float64, copy=True)
    masked[exclude] = -np.inf
    k = int(min(k, np.isfinite(masked).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    best = np.argpartition(-masked, k - 1)[:k]
    best = best[np.argsort(-masked[best], kind="stable")]
    return best, masked[best]


def _source_rows(from_ids: np.ndarray, to_ids: np.ndarray) -> np.ndarray:
    """For each id of ``to_ids``, its row in ``from_ids`` or -1 (ids compared as text)."""
    lookup = {str(item): i for i, item in enumerate(from_ids)}
    return np.array([lookup.get(str(item), -1) for item in to_ids], dtype=np.int64)


def align_item_params(params: ItemParams, from_ids: np.ndarray, to_ids: np.ndarray) -> ItemParams:
    """Re-index item parameters from one catalogue to another by the caller's item ids.

    Items of ``to_ids`` unknown to ``params`` get zero factors and bias (scored by the mean), so a
    model trained on yesterday's catalogue can be evaluated on today's.
    """
    source = _source_rows(from_ids, to_ids)
    known = source >= 0
    factors = np.zeros((len(to_ids), params.n_factors))
    bias = np.zeros(len(to_ids))
    factors[known] = params.factors[source[known]]
    bias[known] = params.bias[source[known]]
    return ItemParams(factors, bias, params.global_mean)


def warm_start_params(
    fresh: ItemParams, previous: ItemParams, previous_ids: np.ndarray, ids: np.ndarray
) -> tuple[ItemParams, int]:
    """Start from a previous model: items it knows take its factors and biases, new items keep
    their fresh initialisation, and the global mean is today's.

    Returns the parameters and how many items were carried over.

    Raises
    ------
    ValueError
        If the previous model has a different number of factors.
    """
    if previous.n_factors != fresh.n_factors:
        raise ValueError(
            f"cannot warm-start {fresh.n_factors} factors from a model with {previous.n_factors}"
        )
    source = _source_rows(previous_ids, ids)
    known = source >= 0
    factors = fresh.factors.copy()
    bias = fresh.bias.copy()
    factors[known] = previous.factors[source[known]]
    bias[known] = previous.bias[source[known]]
    return ItemParams(factors, bias, fresh.global_mean), int(known.sum())
