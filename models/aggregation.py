"""Aggregation rules: pure functions from client contributions to one server-side quantity.

Each rule is small and testable with a few tiny arrays; the server code only converts formats and
calls them (as Flower's ``server/strategy/aggregate.py`` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def aggregate_weighted_average(contributions: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """FedAvg's rule: the average of the clients' arrays weighted by their example counts.

    Parameters
    ----------
    contributions : sequence of (array, weight)
        All arrays have one shape; weights are non-negative.

    Returns
    -------
    ndarray

    Raises
    ------
    ValueError
        If there are no contributions, a weight is negative, or the weights sum to zero.
    """
    if not contributions:
        raise ValueError("cannot average zero client contributions")
    weights = np.array([w for _, w in contributions], dtype=np.float64)
    if np.any(weights < 0):
        raise ValueError(f"client weights must be >= 0, got {weights.tolist()}")
    total = weights.sum()
    if total <= 0:
        raise ValueError("client weights sum to 0: no client reported any training rows")
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a, _ in contributions])
    return np.tensordot(weights / total, stacked, axes=1)


def aggregate_item_sums(
    contributions: Sequence[tuple[np.ndarray, np.ndarray]], n_items: int
) -> np.ndarray:
    """Sum per-item arrays that cover different subsets of items: the exact ALS reduction.

    Parameters
    ----------
    contributions : sequence of (items, values)
        ``items`` (m,) unique indices into ``[0, n_items)``; ``values`` (m, ...) aligned with them.
    n_items : int

    Returns
    -------
    ndarray of shape (n_items, ...)
        Zero for items nobody touched.
    """
    if not contributions:
        raise ValueError("cannot sum zero client contributions")
    tail = contributions[0][1].shape[1:]
    total = np.zeros((n_items, *tail), dtype=np.float64)
    for items, values in contributions:
        total[items] += values  # items are unique within one client, so this is a plain scatter-add
    return total


def aggregate_item_average(
    contributions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-item weighted average of updates from clients that touched different items (FedAvg).

    Parameters
    ----------
    contributions : sequence of (items, values, weights)
        ``values`` (m, ...) and ``weights`` (m,) aligned with the unique ``items``.
    n_items : int

    Returns
    -------
    average : ndarray of shape (n_items, ...)
        Zero where the total weight is zero (an item no client touched keeps its parameters).
    total_weight : ndarray of shape (n_items,)
    """
    if not contributions:
        raise ValueError("cannot average zero client contributions")
    tail = contributions[0][1].shape[1:]
    weighted = np.zeros((n_items, *tail))
    total_weight = np.zeros(n_items)
    for items, values, weights in contributions:
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0):
            raise ValueError("per-item weights must be >= 0")
        weighted[items] += values * w.reshape(-1, *([1] * len(tail)))
        total_weight[items] += w
    average = np.zeros_like(weighted)
    seen = total_weight > 0
    average[seen] = weighted[seen] / total_weight[seen].reshape(-1, *([1] * len(tail)))
    return average, total_weight
