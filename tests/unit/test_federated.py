"""One contract suite over every federated MF algorithm (as implicit's RecommenderBaseTestMixin)."""

import numpy as np
import pytest

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.federation.sampling import client_rng, sample_clients
from models.mf.als import CentralizedALS, RatingRows
from models.mf.federated import MFConfig, run_federated
from tests.unit.helpers import low_rank_interactions

ALGORITHMS = ["als", "fedavg", "fedprox", "fedadam", "fedyogi"]


@pytest.fixture(scope="module")
def federation():
    data = low_rank_interactions(n_users=150, n_items=60, density=0.35, rank=3, noise=0.2, seed=4)
    client_of_user = assign_clients(data, n_clients=5, strategy="iid", rng=np.random.default_rng(0))
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.2)
    return data, build_clients(data, client_of_user, split)


def _centralized_test_rmse(data, clients, config):
    train = [(c.client_id, c.rows("train")) for c in clients]
    offsets = np.cumsum([0] + [c.n_users for c in clients])
    users = np.concatenate([rows.users + offsets[i] for i, rows in train])
    items = np.concatenate([rows.items for _, rows in train])
    ratings = np.concatenate([rows.ratings for _, rows in train])
    model = CentralizedALS(n_factors=config.n_factors, reg=config.reg, n_iter=20).fit(
        RatingRows(users, items, ratings, n_users=int(offsets[-1]), n_items=data.n_items)
    )
    test_users = np.concatenate([c.rows("test").users + offsets[i] for i, c in enumerate(clients)])
    test_items = np.concatenate([c.rows("test").items for c in clients])
    truth = np.concatenate([c.rows("test").ratings for c in clients])
    return float(np.sqrt(np.mean((model.predict(test_users, test_items) - truth) ** 2)))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_contract_updates_are_item_level_and_training_converges(algorithm, federation):
    data, clients = federation
    config = MFConfig(algorithm=algorithm, n_factors=3, reg=0.05)
    seen = []

    state, history = run_federated(
        clients,
        data.n_items,
        config,
        rounds=50,
        seed=1,
        eval_splits=("test",),
        on_round=seen.append,
    )

    assert [r.round for r in history] == list(range(1, 51)) and seen == history
    assert state.round == 50
    assert all(r.n_clients == 5 and r.upload_bytes > 0 for r in history)
    final = history[-1].metrics["test/rmse"]
    assert final < 0.8 * history[0].metrics["test/rmse"]
    reference = _centralized_test_rmse(data, clients, config)
    assert final < 1.05 * reference, (final, reference)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_contract_same_seed_same_model(algorithm, federation):
    data, clients = federation
    config = MFConfig(algorithm=algorithm, n_factors=2)
    a, _ = run_federated(clients, data.n_items, config, rounds=2, seed=3, eval_splits=())
    b, _ = run_federated(clients[::-1], data.n_items, config, rounds=2, seed=3, eval_splits=())
    np.testing.assert_allclose(a.params.factors, b.params.factors, atol=1e-12)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_contract_update_shapes_carry_no_user_dimension(algorithm, federation):
    from models.mf.federated import client_rating_sums, client_update, init_global_state

    data, clients = federation
    config = MFConfig(algorithm=algorithm, n_factors=3)
    state = init_global_state(
        data.n_items, config, [client_rating_sums(c) for c in clients], seed=0
    )
    client = clients[0]

    update = client_update(client, state.params, config, client_rng(0, 1, client.client_id))

    assert np.all(np.diff(update.items) > 0)
    assert update.counts.sum() == len(client.rows("train"))
    for name, array in update.arrays.items():
        assert array.shape[0] == update.items.size, name
    assert set(update.metrics) == {"train_sse", "train_n"}
    assert (
        update.nbytes()
        == update.items.nbytes
        + update.counts.nbytes
        + sum(a.nbytes for a in update.arrays.values())
        + 16
    )


def test_als_upload_is_packed_statistics_of_touched_items_only(federation):
    data, clients = federation
    config = MFConfig(algorithm="als", n_factors=4)
    _, history = run_federated(clients, data.n_items, config, rounds=1, eval_splits=())
    d = config.n_factors + 1
    touched = sum(np.unique(c.rows("train").items).size for c in clients)
    per_item = (
        8 * (d * (d + 1) // 2 + d) + 8 + 8
    )  # packed gram + rhs (float64), item id + count (int64)
    assert history[0].upload_bytes == touched * per_item + 16 * len(clients)


def test_client_sampling_is_seeded_and_sized():
    a = sample_clients(20, 0.25, seed=1, round_=3)
    assert a.size == 5 and np.array_equal(a, sample_clients(20, 0.25, seed=1, round_=3))
    assert not np.array_equal(a, sample_clients(20, 0.25, seed=1, round_=4))
    assert sample_clients(20, 0.01, seed=1, round_=1).size == 1
    np.testing.assert_array_equal(sample_clients(3, 1.0, seed=0, round_=1), [0, 1, 2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "sgd"}, "allowed: als, fedavg"),
        ({"n_factors": 0}, "n_factors=0"),
        ({"reg": -1.0}, "reg=-1.0"),
        ({"server_lr": 0.0}, "server_lr=0.0"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFConfig(**kwargs)


@pytest.mark.parametrize("algorithm", ["als", "fedavg"])
def test_client_round_is_evaluate_then_update_with_one_fold_in(algorithm, federation):
    from models.mf.federated import (
        client_rating_sums,
        client_round,
        client_update,
        evaluate_client_splits,
        init_global_state,
    )

    data, clients = federation
    config = MFConfig(algorithm=algorithm, n_factors=3)
    state = init_global_state(
        data.n_items, config, [client_rating_sums(c) for c in clients], seed=0
    )
    client = clients[1]

    update, evaluations = client_round(
        client, state.params, config, client_rng(0, 2, 1), ("train", "valid", "test")
    )

    alone = client_update(client, state.params, config, client_rng(0, 2, 1))
    expected = evaluate_client_splits(client, state.params, config, ("train", "valid", "test"))
    np.testing.assert_array_equal(update.items, alone.items)
    for name in update.arrays:
        np.testing.assert_allclose(update.arrays[name], alone.arrays[name], atol=1e-12)
    for split in expected:
        assert evaluations[split][0] == pytest.approx(expected[split][0])
    assert evaluations["train"][0]["sse"] == pytest.approx(update.metrics["train_sse"])
