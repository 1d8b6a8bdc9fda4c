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
