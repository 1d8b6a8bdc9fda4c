import numpy as np
import pytest

from models.data.partitions import build_clients
from models.data.sharding import assign_clients
from models.mf.als import CentralizedALS, RatingRows
from models.mf.federated import (
    MFConfig,
    client_rating_sums,
    client_update,
    init_global_state,
    server_update,
)
from tests.unit.helpers import low_rank_interactions


def _federated_als(clients, n_items, config, rounds, seed):
    state = init_global_state(n_items, config, [client_rating_sums(c) for c in clients], seed)
    for r in range(rounds):
        updates = [
            client_update(c, state.params, config, np.random.default_rng(r)) for c in clients
        ]
        state = server_update(state, updates, config)
    return state


@pytest.mark.parametrize("strategy", ["iid", "dirichlet"])
def test_federated_als_equals_centralized_als(strategy):
    data = low_rank_interactions(n_users=80, n_items=50, density=0.3, noise=0.3)
    frame = data.frame
    split = np.zeros(len(frame), dtype=np.int8)
    clients = build_clients(
        data,
        assign_clients(data, n_clients=4, strategy=strategy, rng=np.random.default_rng(0)),
        split,
    )
    config = MFConfig(algorithm="als", n_factors=4, reg=0.05)

    state = _federated_als(clients, data.n_items, config, rounds=6, seed=7)
    central = CentralizedALS(n_factors=4, reg=0.05, n_iter=6, seed=7).fit(
        RatingRows(
            frame["user"],
            frame["item"],
            frame["rating"],
            n_users=data.n_users,
            n_items=data.n_items,
        )
    )

    np.testing.assert_allclose(
        state.params.factors, central.item_params_.factors, atol=1e-8, rtol=0
    )
    np.testing.assert_allclose(state.params.bias, central.item_params_.bias, atol=1e-8, rtol=0)
    assert state.params.global_mean == pytest.approx(central.item_params_.global_mean, abs=1e-12)


def test_als_recovers_withheld_cells_of_low_rank_data():
    data = low_rank_interactions(n_users=120, n_items=60, density=0.6, rank=2)
    frame = data.frame
    rng = np.random.default_rng(0)
    held = rng.random(len(frame)) < 0.1
    train = frame[~held]
    rows = RatingRows(
        train["user"], train["item"], train["rating"], n_users=data.n_users, n_items=data.n_items
    )

    model = CentralizedALS(n_factors=2, reg=1e-3, n_iter=30, seed=0).fit(rows)
    predicted = model.predict(frame["user"].to_numpy()[held], frame["item"].to_numpy()[held])

    rmse = np.sqrt(np.mean((predicted - frame["rating"].to_numpy()[held]) ** 2))
    spread = frame["rating"].to_numpy()[held].std()
    assert rmse < 0.05 * spread


def test_empty_client_and_untouched_item_are_handled():
    data = low_rank_interactions(n_users=30, n_items=20, density=0.4)
    split = np.zeros(len(data.frame), dtype=np.int8)
    client_of_user = assign_clients(data, n_clients=3, strategy="iid", rng=np.random.default_rng(0))
    clients = build_clients(data, client_of_user, split)
    # client 2 has no training rows at all; item 0 has no training rows anywhere
    for c, client in enumerate(clients):
        frame = client.frame.copy()
        frame.loc[(frame["item"] == 0) | (c == 2), "split"] = 2
        clients[c] = type(client)(client.client_id, client.user_ids, client.n_items, frame)
    config = MFConfig(algorithm="als", n_factors=3)
    state = init_global_state(
        data.n_items, config, [client_rating_sums(c) for c in clients], seed=0
    )

    updates = [client_update(c, state.params, config, np.random.default_rng(0)) for c in clients]
    new = server_update(state, updates, config)

    assert updates[2].items.size == 0 and updates[2].metrics["train_n"] == 0
    touched = np.unique(np.concatenate([u.items for u in updates]))
    untouched = np.setdiff1d(np.arange(data.n_items), touched)
    assert 0 in untouched
    np.testing.assert_array_equal(new.params.factors[untouched], state.params.factors[untouched])
    assert not np.allclose(new.params.factors[touched], state.params.factors[touched])


def test_round_with_no_updates_keeps_parameters():
    data = low_rank_interactions(n_users=10, n_items=8)
    config = MFConfig(algorithm="fedavg", n_factors=2)
    state = init_global_state(data.n_items, config, [{"rating_sum": 30.0, "n": 10.0}], seed=0)
    new = server_update(state, [], config)
    assert new.round == 1
    np.testing.assert_array_equal(new.params.factors, state.params.factors)


def test_centralized_als_rejects_bad_hyperparameters():
    rows = RatingRows(np.zeros(1, int), np.zeros(1, int), np.ones(1), n_users=1, n_items=1)
    with pytest.raises(ValueError, match="reg > 0"):
        CentralizedALS(reg=0).fit(rows)
    with pytest.raises(RuntimeError, match="not fitted"):
        CentralizedALS().predict(np.zeros(1, int), np.zeros(1, int))


def test_item_statistics_are_the_sums_written_out():
    from models.mf.als import UserParams, item_statistics
    from models.mf.linalg import unpack_symmetric

    rng = np.random.default_rng(5)
    users, items = np.array([0, 0, 1, 2, 2, 2]), np.array([1, 3, 1, 0, 1, 3])
    ratings = rng.uniform(1, 5, users.size)
    people = UserParams(rng.normal(size=(3, 2)), rng.normal(size=3))
    mean = 3.1

    stats = item_statistics(RatingRows(users, items, ratings, n_users=3, n_items=4), people, mean)

    assert stats.items.tolist() == [0, 1, 3] and stats.counts.tolist() == [1, 3, 2]
    for j, item in enumerate(stats.items):
        gram, rhs = np.zeros((3, 3)), np.zeros(3)
        for u, i, r in zip(users, items, ratings, strict=True):
            if i == item:
                x = np.append(people.factors[u], 1.0)  # [p_u, 1]
                gram += np.outer(x, x)
                rhs += (r - mean - people.bias[u]) * x
        np.testing.assert_allclose(unpack_symmetric(stats.grams[j : j + 1], 3)[0], gram)
        np.testing.assert_allclose(stats.rhs[j], rhs)


def test_solve_items_solves_the_weighted_ridge_and_keeps_untouched_items():
    from models.mf.als import ItemStatistics, solve_items
    from models.mf.linalg import pack_symmetric
    from models.mf.params import ItemParams

    rng = np.random.default_rng(6)
    params = ItemParams(rng.normal(size=(4, 2)), rng.normal(size=4), 3.0)
    a = rng.normal(size=(5, 3))
    gram, rhs = a.T @ a, rng.normal(size=3)
    # item 0 is listed with no rows (as noisy DP counts can round to), item 2 has 4 rows
    stats = ItemStatistics(
        np.array([0, 2]),
        np.array([0, 4]),
        pack_symmetric(np.stack([gram, gram])),
        np.stack([rhs, rhs]),
    )

    out = solve_items(params, stats, reg=0.1)

    want = np.linalg.solve(gram + 0.1 * 4 * np.eye(3), rhs)  # weighted lambda: reg x count
    np.testing.assert_allclose(out.factors[2], want[:2])
    assert out.bias[2] == pytest.approx(want[2])
    for kept in (0, 1, 3):  # no rows, or not in the statistics: the parameters stay
        np.testing.assert_array_equal(out.factors[kept], params.factors[kept])
        assert out.bias[kept] == params.bias[kept]


def test_predict_ratings_is_the_biased_dot_product_for_every_row():
    from models.mf.als import UserParams, predict_ratings
    from models.mf.params import ItemParams

    rng = np.random.default_rng(8)
    people = UserParams(rng.normal(size=(4, 3)), rng.normal(size=4))
    params = ItemParams(rng.normal(size=(5, 3)), rng.normal(size=5), 3.5)
    users, items = rng.integers(0, 4, 20), rng.integers(0, 5, 20)

    got = predict_ratings(people, params, users, items)

    want = [3.5 + people.bias[u] + params.bias[i] + people.factors[u] @ params.factors[i]
            for u, i in zip(users, items, strict=True)]  # fmt: skip
    np.testing.assert_allclose(got, want)


def test_solve_users_for_a_single_user_is_the_closed_form():
    from models.mf.als import solve_users
    from models.mf.params import ItemParams

    rng = np.random.default_rng(9)
    params = ItemParams(rng.normal(size=(6, 2)), rng.normal(size=6), 3.0)
    items, ratings = np.array([0, 2, 5]), np.array([4.0, 2.0, 5.0])

    people = solve_users(
        RatingRows(np.zeros(3, int), items, ratings, n_users=1, n_items=6), params, reg=0.2
    )

    x = np.column_stack([params.factors[items], np.ones(3)])  # [q_i, 1]
    target = ratings - 3.0 - params.bias[items]
    want = np.linalg.solve(x.T @ x + 0.2 * 3 * np.eye(3), x.T @ target)
    np.testing.assert_allclose(people.factors[0], want[:2])
    assert people.bias[0] == pytest.approx(want[2])


def test_solve_items_solves_an_item_with_a_single_row():
    from models.mf.als import ItemStatistics, solve_items
    from models.mf.linalg import pack_symmetric
    from models.mf.params import ItemParams

    params = ItemParams(np.zeros((2, 1)), np.zeros(2), 3.0)
    x, residual = np.array([0.5, 1.0]), 1.5  # one rating of item 1
    stats = ItemStatistics(
        np.array([1]), np.array([1]), pack_symmetric(np.outer(x, x)[None]), (residual * x)[None]
    )

    out = solve_items(params, stats, reg=0.1)

    want = np.linalg.solve(np.outer(x, x) + 0.1 * np.eye(2), residual * x)
    np.testing.assert_allclose([out.factors[1, 0], out.bias[1]], want)


def test_centralized_als_accepts_the_smallest_valid_settings():
    rows = RatingRows(
        np.array([0, 1]), np.array([0, 1]), np.array([4.0, 2.0]), n_users=2, n_items=2
    )

    model = CentralizedALS(n_factors=1, n_iter=0, reg=0.1).fit(rows)  # one factor, no sweep

    assert model.item_params_.factors.shape == (2, 1)
    for bad in ({"n_factors": 0}, {"n_iter": -1}, {"reg": 0.0}):
        with pytest.raises(ValueError, match="need n_factors >= 1"):
            CentralizedALS(**bad).fit(rows)


def test_solve_items_adds_the_extra_ridge_to_the_weighted_one():
    from models.mf.als import ItemStatistics, solve_items
    from models.mf.linalg import pack_symmetric
    from models.mf.params import ItemParams

    x, residual = np.array([0.5, 1.0]), 1.5
    stats = ItemStatistics(
        np.array([0]), np.array([2]), pack_symmetric(np.outer(x, x)[None]), (residual * x)[None]
    )

    out = solve_items(
        ItemParams(np.zeros((1, 1)), np.zeros(1), 3.0), stats, reg=0.1, extra_ridge=0.7
    )

    want = np.linalg.solve(np.outer(x, x) + (0.1 * 2 + 0.7) * np.eye(2), residual * x)
    np.testing.assert_allclose([out.factors[0, 0], out.bias[0]], want)
