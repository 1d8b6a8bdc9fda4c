"""Implicit-feedback ALS (Hu, Koren and Volinsky, 2008), split into client and server halves.

Every (user, item) pair has preference ``p = 1`` if observed, else 0, with confidence
``c = 1 + alpha * r`` (``r`` the observed count or rating; 1 for unobserved pairs). The user
half-step needs the global ``Y^T Y`` (from the public item factors) plus the user's own rows. The
item half-step needs ``X^T X`` over all users, which each client sends as one k x k sum over its
users, plus per-item sums over the observed rows: so the server again only sees aggregates, and a
federated round equals a centralized sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.mf.als import ItemStatistics, RatingRows, UserParams
from models.mf.linalg import ridge_solve, unpack_symmetric
from models.mf.params import ItemParams, init_item_params


@dataclass(frozen=True)
class ImplicitStatistics:
    """One client's (or everyone's) statistics for the implicit item half-step.

    ``items`` holds, per observed item, ``sum (c - 1) x x^T`` (packed) and ``sum c x``;
    ``user_gram`` is ``sum x x^T`` over all of the client's users, observed items or not.
    """

    items: ItemStatistics
    user_gram: np.ndarray  # (k, k)


def _confidence_terms(ratings: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    extra = alpha * ratings  # c - 1 > 0 for every observed row
    return extra, 1.0 + extra


def solve_users_implicit(
    rows: RatingRows, params: ItemParams, *, reg: float, alpha: float
) -> UserParams:
    """``x_u = (Y^T Y + Y^T (C_u - I) Y + reg I)^-1 Y^T C_u p_u`` for every user with rows."""
    k = params.n_factors
    factors = np.zeros((rows.n_users, k))
    layout = rows.by_user
    if layout.keys.size:
        extra, confidence = _confidence_terms(rows.ratings, alpha)
        yty = params.factors.T @ params.factors
        factors[layout.keys] = layout.solve(
            params.factors, confidence, np.full(layout.keys.size, reg), gram_weights=extra, base=yty
        )
    return UserParams(factors, np.zeros(rows.n_users))


def implicit_statistics(
    rows: RatingRows, user_params: UserParams, *, alpha: float
) -> ImplicitStatistics:
    """The client half of the item step, over its observed rows and all its users."""
    layout = rows.by_item
    extra, confidence = _confidence_terms(rows.ratings, alpha)
    grams, rhs = layout.packed_statistics(user_params.factors, confidence, gram_weights=extra)
    stats = ItemStatistics(layout.keys.astype(np.int64), layout.counts, grams, rhs)
    return ImplicitStatistics(stats, user_params.factors.T @ user_params.factors)


def solve_items_implicit(
    params: ItemParams, stats: ItemStatistics, user_gram: np.ndarray, *, reg: float
) -> ItemParams:
    """The server half: ``y_i = (X^T X + sum (c - 1) x x^T + reg I)^-1 sum c x``.

    Items nobody observed get zero factors: with no positive evidence the exact solution is 0.
    """
    k = params.n_factors
    factors = np.zeros_like(params.factors)
    touched = stats.counts > 0
    if np.any(touched):
        grams = unpack_symmetric(stats.grams[touched], k) + user_gram
        ridge = np.full((int(touched.sum()), k), reg)
        factors[stats.items[touched]] = ridge_solve(
            grams, stats.rhs[touched], ridge, overwrite=True
        )
    return ItemParams(factors, np.zeros(params.n_items), 0.0)


class CentralizedImplicitALS:
    """The reference: implicit ALS with every row in one place.

    Parameters
    ----------
    n_factors, reg, alpha, n_iter, init_std, seed
        ``alpha`` scales confidence, ``c = 1 + alpha * r``.
    """

    def __init__(
        self,
        n_factors: int = 32,
        reg: float = 0.1,
        alpha: float = 10.0,
        n_iter: int = 10,
        init_std: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.n_factors = n_factors
        self.reg = reg
        self.alpha = alpha
        self.n_iter = n_iter
        self.init_std = init_std
        self.seed = seed

    def fit(self, rows: RatingRows) -> CentralizedImplicitALS:
        if self.n_factors < 1 or self.reg <= 0 or self.alpha <= 0:
            raise ValueError(
                f"n_factors={self.n_factors}, reg={self.reg}, alpha={self.alpha}: need n_factors >= 1, reg > 0, alpha > 0"
            )
        params = init_item_params(
            rows.n_items, self.n_factors, 0.0, np.random.default_rng(self.seed), self.init_std
        )
        for _ in range(self.n_iter):
            users = solve_users_implicit(rows, params, reg=self.reg, alpha=self.alpha)
            stats = implicit_statistics(rows, users, alpha=self.alpha)
            params = solve_items_implicit(params, stats.items, stats.user_gram, reg=self.reg)
        self.item_params_ = params
        self.user_params_ = solve_users_implicit(rows, params, reg=self.reg, alpha=self.alpha)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        """Preference scores of every item for the given users: (len(users), n_items)."""
        if not hasattr(self, "item_params_"):
            raise RuntimeError("CentralizedImplicitALS is not fitted yet: call fit() first")
        return self.user_params_.factors[users] @ self.item_params_.factors.T
