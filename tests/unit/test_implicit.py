import numpy as np
import pytest

from models.aggregation import aggregate_item_sums
from models.data.partitions import build_clients
from models.data.sharding import assign_clients
from models.mf.als import ItemStatistics, RatingRows, UserParams
from models.mf.implicit import (
    CentralizedImplicitALS,
    implicit_statistics,
    solve_items_implicit,
    solve_users_implicit,
)
from models.mf.params import init_item_params
from tests.unit.helpers import low_rank_interactions


def _dense_oracle_user(y, items, ratings, reg, alpha):
    """Hu et al.'s formula written out densely over every item (by symmetry, also an item's
    over every user, with the users' factors as ``y``)."""
    n_items, k = y.shape
    c = np.ones(n_items)
    p = np.zeros(n_items)
    c[items] += alpha * ratings
    p[items] = 1.0
    return np.linalg.solve(y.T @ (c[:, None] * y) + reg * np.eye(k), y.T @ (c * p))


def test_user_step_matches_the_dense_formula():
    rng = np.random.default_rng(0)
    params = init_item_params(12, 3, 0.0, rng, 0.5)
    users = np.array([0, 0, 0, 1, 1])
    items = np.array([1, 4, 7, 2, 4])
    ratings = np.array([1.0, 3.0, 2.0, 5.0, 1.0])
    rows = RatingRows(users, items, ratings, n_users=3, n_items=12)

    solved = solve_users_implicit(rows, params, reg=0.1, alpha=2.0)

    for u in (0, 1):
        mask = users == u
        expected = _dense_oracle_user(params.factors, items[mask], ratings[mask], 0.1, 2.0)
        np.testing.assert_allclose(solved.factors[u], expected, atol=1e-10)
    assert np.all(solved.factors[2] == 0)  # no rows, no factors


def test_item_step_matches_the_dense_formula():
    # the item side of Hu et al.: y_i = (X^T C_i X + reg I)^-1 X^T C_i p_i over every user, with
    # c = 1 + alpha r on the item's rows and 1 elsewhere
    rng = np.random.default_rng(3)
    n_users, n_items, k, reg, alpha = 6, 8, 3, 0.3, 2.0
    users = np.array([0, 0, 1, 2, 2, 3, 5, 5])
    items = np.array([1, 4, 1, 2, 4, 6, 1, 7])
    ratings = np.array([1.0, 3.0, 2.0, 5.0, 1.0, 2.0, 1.0, 4.0])
    rows = RatingRows(users, items, ratings, n_users=n_users, n_items=n_items)
    x = rng.normal(size=(n_users, k))

    stats = implicit_statistics(rows, UserParams(x, np.zeros(n_users)), alpha=alpha)
    params = init_item_params(n_items, k, 0.0, rng, 0.1)
    solved = solve_items_implicit(params, stats.items, stats.user_gram, reg=reg).factors

    for i in np.unique(items):
        mask = items == i
        expected = _dense_oracle_user(x, users[mask], ratings[mask], reg, alpha)
        np.testing.assert_allclose(solved[i], expected, rtol=0, atol=1e-10)


def test_federated_implicit_als_equals_centralized():
    data = low_rank_interactions(n_users=70, n_items=40, density=0.2, seed=3)
    frame = data.frame.assign(rating=1.0)
    split = np.zeros(len(frame), dtype=np.int8)
    data = type(data)(frame, data.user_ids, data.item_ids)
    clients = build_clients(
        data, assign_clients(data, n_clients=4, strategy="iid", rng=np.random.default_rng(0)), split
    )
    reg, alpha = 0.1, 5.0

    params = init_item_params(data.n_items, 4, 0.0, np.random.default_rng(7), 0.1)
    for _ in range(5):
        parts = []
        for client in clients:
            rows = client.rows("train")
            parts.append(
                implicit_statistics(
                    rows, solve_users_implicit(rows, params, reg=reg, alpha=alpha), alpha=alpha
                )
            )
        counts = aggregate_item_sums([(p.items.items, p.items.counts) for p in parts], data.n_items)
        grams = aggregate_item_sums([(p.items.items, p.items.grams) for p in parts], data.n_items)
        rhs = aggregate_item_sums([(p.items.items, p.items.rhs) for p in parts], data.n_items)
        touched = np.flatnonzero(counts > 0)
        summed = ItemStatistics(touched, counts[touched].astype(int), grams[touched], rhs[touched])
        params = solve_items_implicit(params, summed, sum(p.user_gram for p in parts), reg=reg)
    central = CentralizedImplicitALS(n_factors=4, reg=reg, alpha=alpha, n_iter=5, seed=7).fit(
        RatingRows(
            frame["user"],
            frame["item"],
            frame["rating"],
            n_users=data.n_users,
            n_items=data.n_items,
        )
    )

    np.testing.assert_allclose(params.factors, central.item_params_.factors, atol=1e-8, rtol=0)


def test_checkerboard_with_the_diagonal_withheld_recommends_the_withheld_item():
    # implicit's classic: users and items in two blocks; each user saw every item of its block
    # except "its own" one, which the model must rank first among the unseen.
    n = 10
    users, items = [], []
    for u in range(n):
        for i in range(n):
            if (u < n // 2) == (i < n // 2) and u != i:
                users.append(u)
                items.append(i)
    rows = RatingRows(np.array(users), np.array(items), np.ones(len(users)), n_users=n, n_items=n)

    model = CentralizedImplicitALS(n_factors=3, reg=0.01, alpha=10.0, n_iter=15, seed=0).fit(rows)
    scores = model.scores(np.arange(n))

    seen = np.zeros((n, n), dtype=bool)
    seen[rows.users, rows.items] = True
    scores[seen] = -np.inf
    np.testing.assert_array_equal(scores.argmax(axis=1), np.arange(n))


def test_bad_hyperparameters_are_rejected():
    rows = RatingRows(np.zeros(1, int), np.zeros(1, int), np.ones(1), n_users=1, n_items=1)
    with pytest.raises(ValueError, match="alpha > 0"):
        CentralizedImplicitALS(alpha=0).fit(rows)


def _dense_implicit_als(
    users, items, ratings, n_users, n_items, k, reg, alpha, n_iter, seed, init_std
):
    """Hu, Koren and Volinsky written out densely: C = 1 + alpha R on observed cells, 1 elsewhere;
    P = 1 on observed cells. Users/items without rows get zero factors. Same start as the code:
    item factors drawn N(0, init_std) from default_rng(seed)."""
    c = np.ones((n_users, n_items))
    p = np.zeros((n_users, n_items))
    c[users, items] += alpha * ratings
    p[users, items] = 1.0
    y = np.random.default_rng(seed).normal(0.0, init_std, size=(n_items, k))

    def half_step(other, conf, pref, active):
        out = np.zeros((conf.shape[0], k))
        for a in np.flatnonzero(active):
            lhs = other.T @ (conf[a][:, None] * other) + reg * np.eye(k)
            out[a] = np.linalg.solve(lhs, other.T @ (conf[a] * pref[a]))
        return out

    has_user = np.isin(np.arange(n_users), users)
    has_item = np.isin(np.arange(n_items), items)
    for _ in range(n_iter):
        x = half_step(y, c, p, has_user)
        y = half_step(x, c.T, p.T, has_item)
    x = half_step(y, c, p, has_user)
    return x @ y.T


# the smallest valid settings: one factor, a confidence weight below 1
@pytest.mark.parametrize(("n_factors", "alpha"), [(1, 2.0), (2, 0.5)])
def test_smallest_valid_hyperparameters_fit_the_dense_formula(n_factors, alpha):
    rng = np.random.default_rng(4)
    n_users, n_items, reg, n_iter, seed, init_std = 9, 7, 0.2, 4, 3, 0.3
    cells = np.flatnonzero(rng.random(n_users * n_items) < 0.35)
    users, items = np.divmod(cells, n_items)
    ratings = rng.integers(1, 4, cells.size).astype(float)
    rows = RatingRows(users, items, ratings, n_users=n_users, n_items=n_items)

    model = CentralizedImplicitALS(
        n_factors=n_factors, reg=reg, alpha=alpha, n_iter=n_iter, init_std=init_std, seed=seed
    ).fit(rows)

    want = _dense_implicit_als(
        users, items, ratings, n_users, n_items, n_factors, reg, alpha, n_iter, seed, init_std
    )
    np.testing.assert_allclose(model.scores(np.arange(n_users)), want, rtol=0, atol=1e-9)


def test_zero_ridge_is_rejected():
    rows = RatingRows(np.zeros(1, int), np.zeros(1, int), np.ones(1), n_users=1, n_items=1)
    with pytest.raises(ValueError, match="reg > 0"):
        CentralizedImplicitALS(reg=0.0).fit(rows)
