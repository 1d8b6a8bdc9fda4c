"""Alternating least squares for biased MF, split into the halves a federation needs.

The user half (:func:`solve_users`) runs on a client over its own rows. The item half is
:func:`item_statistics` on each client (sufficient statistics for the items it touched), a sum on
the server, then :func:`solve_items`. Because sums commute, one federated round equals one
centralized ALS sweep over the union of the clients' rows.

Regularisation is weighted-lambda (Zhou et al., 2008): the ridge on an entity is ``reg * n`` where
``n`` is its number of training ratings, applied to factors and bias alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from models.mf.linalg import SegmentLayout, ridge_solve, unpack_symmetric
from models.mf.params import ItemParams, init_item_params

_PREDICT_BLOCK = 8192


class RatingRows:
    """(user, item, rating) rows plus their user- and item-grouped layouts, built once and reused
    every round (the rows of a client do not change between rounds).

    Parameters
    ----------
    users, items : ndarray of int
        Indices in ``[0, n_users)`` and ``[0, n_items)``.
    ratings : ndarray of float
    n_users, n_items : int
    """

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        ratings: np.ndarray,
        *,
        n_users: int,
        n_items: int,
    ) -> None:
        self.users = np.asarray(users, dtype=np.int64)
        self.items = np.asarray(items, dtype=np.int64)
        self.ratings = np.asarray(ratings, dtype=np.float64)
        self.n_users = n_users
        self.n_items = n_items

    def __len__(self) -> int:
        return self.users.size

    @cached_property
    def by_user(self) -> SegmentLayout:
        return SegmentLayout.build(self.users, self.items, self.n_items)

    @cached_property
    def by_item(self) -> SegmentLayout:
        return SegmentLayout.build(self.items, self.users, self.n_users)


@dataclass(frozen=True)
class UserParams:
    """Personal parameters; they exist only on the client that owns the users."""

    factors: np.ndarray  # (n_users, k)
    bias: np.ndarray  # (n_users,)


@dataclass(frozen=True)
class ItemStatistics:
    """Per-item sufficient statistics over some set of ratings: the ALS upload.

    ``grams[j]`` packs (see :func:`~models.mf.linalg.pack_symmetric`) ``sum_u x_u x_u^T`` and
    ``rhs[j] = sum_u (r_ui - mu - b_u) x_u`` with ``x_u = [p_u, 1]``, for item ``items[j]``
    rated ``counts[j]`` times.
    """

    items: np.ndarray  # (m,) sorted item indices
    counts: np.ndarray  # (m,)
    grams: np.ndarray  # (m, (k + 1)(k + 2) / 2), packed upper triangles
    rhs: np.ndarray  # (m, k + 1)


def _with_ones(factors: np.ndarray) -> np.ndarray:
    return np.column_stack([factors, np.ones(factors.shape[0])])


def solve_users(rows: RatingRows, params: ItemParams, *, reg: float) -> UserParams:
    """Closed-form user factors and biases given fixed item parameters.

    Parameters
    ----------
    rows : RatingRows
        Users without rows get zero factors and bias (they are then predicted by ``mu + b_i``).
    params : ItemParams
    reg : float
        Weighted-lambda ridge coefficient.

    Returns
    -------
    UserParams
    """
    k = params.n_factors
    factors = np.zeros((rows.n_users, k))
    bias = np.zeros(rows.n_users)
    layout = rows.by_user
    if layout.keys.size == 0:
        return UserParams(factors, bias)
    target = rows.ratings - params.global_mean - params.bias[rows.items]
    solution = layout.solve(_with_ones(params.factors), target, reg * layout.counts)
    factors[layout.keys] = solution[:, :k]
    bias[layout.keys] = solution[:, k]
    return UserParams(factors, bias)


def item_statistics(
    rows: RatingRows, user_params: UserParams, global_mean: float
) -> ItemStatistics:
    """Sufficient statistics for the item half-step over the given rows (one client's, or all)."""
    layout = rows.by_item
    target = rows.ratings - global_mean - user_params.bias[rows.users]
    grams, rhs = layout.packed_statistics(_with_ones(user_params.factors), target)
    return ItemStatistics(layout.keys.astype(np.int64), layout.counts, grams, rhs)


def solve_items(
    params: ItemParams, stats: ItemStatistics, *, reg: float, extra_ridge: float = 0.0
) -> ItemParams:
    """Item half-step from (summed) statistics; items absent from ``stats`` keep their parameters.

    ``extra_ridge`` is added to every diagonal on top of the weighted-lambda term (DP's noisy
    Gram matrices need it to stay positive definite)."""
    k = params.n_factors
    factors = params.factors.copy()
    bias = params.bias.copy()
    touched = stats.counts > 0
    if np.any(touched):
        grams = unpack_symmetric(stats.grams[touched], k + 1)
        ridge = np.repeat(
            (reg * stats.counts[touched].astype(np.float64) + extra_ridge)[:, None], k + 1, axis=1
        )
        solution = ridge_solve(grams, stats.rhs[touched], ridge, overwrite=True)
        idx = stats.items[touched]
        factors[idx] = solution[:, :k]
        bias[idx] = solution[:, k]
    return ItemParams(factors, bias, params.global_mean)


def predict_ratings(
    user_params: UserParams, params: ItemParams, users: np.ndarray, items: np.ndarray
) -> np.ndarray:
    """``mu + b_u + b_i + p_u . q_i`` for each (user, item) row."""
    out = params.global_mean + user_params.bias[users] + params.bias[items]
    # In blocks: whole-size (rows, k) gathers are fresh mmaps whose page faults cost more than the
    # arithmetic; blocks of a few MB are recycled by the allocator.
    for lo in range(0, users.size, _PREDICT_BLOCK):
        block = slice(lo, lo + _PREDICT_BLOCK)
        out[block] += np.einsum(
            "ij,ij->i", user_params.factors[users[block]], params.factors[items[block]]
        )
    return out


class CentralizedALS:
    """The reference: the same biased MF solved by ALS with all ratings in one place.

    Parameters
    ----------
    n_factors : int
    reg : float
        Weighted-lambda ridge coefficient.
    n_iter : int
        Full sweeps (user half, then item half).
    init_std : float
        Standard deviation of the initial item factors.
    seed : int
    """

    def __init__(
        self,
        n_factors: int = 32,
        reg: float = 0.05,
        n_iter: int = 15,
        init_std: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.n_factors = n_factors
        self.reg = reg
        self.n_iter = n_iter
        self.init_std = init_std
        self.seed = seed

    def fit(self, rows: RatingRows) -> CentralizedALS:
        if self.n_factors < 1 or self.n_iter < 0 or self.reg <= 0:
            raise ValueError(
                f"n_factors={self.n_factors}, n_iter={self.n_iter}, reg={self.reg}: "
                "need n_factors >= 1, n_iter >= 0, reg > 0"
            )
        rng = np.random.default_rng(self.seed)
        mean = float(rows.ratings.mean()) if len(rows) else 0.0
        params = init_item_params(rows.n_items, self.n_factors, mean, rng, self.init_std)
        for _ in range(self.n_iter):
            user_params = solve_users(rows, params, reg=self.reg)
            params = solve_items(params, item_statistics(rows, user_params, mean), reg=self.reg)
        self.item_params_ = params
        self.user_params_ = solve_users(rows, params, reg=self.reg)
        return self

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        if not hasattr(self, "item_params_"):
            raise RuntimeError("CentralizedALS is not fitted yet: call fit() first")
        return predict_ratings(self.user_params_, self.item_params_, users, items)
