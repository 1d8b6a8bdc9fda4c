"""The explicit family's server side at its edges: FedAvg's step, the settings' bounds, the
starting mean, the secure encoding of every kind of update, the released popularity and the
training split's evaluation.

Oracles: FedAvg's definition (the new item parameters are the clients' local models averaged with
their row counts as weights, ``np.average``), updates combined by hand, and the bounds each
setting states.
"""

import numpy as np
import pytest

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.mf.federated import (
    MFConfig,
    evaluate_client_splits,
    from_dense_sum,
    init_global_state,
    server_bias_update,
    server_update,
    to_dense,
)
from models.privacy.dp import UserLevelDP
from models.protocol import ClientUpdate
from tests.unit.helpers import low_rank_interactions


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_by_default_take_the_count_weighted_average_of_the_local_models(
    algorithm,
):
    config = MFConfig(algorithm=algorithm, n_factors=2)
    state = init_global_state(4, config, [{"rating_sum": 9.0, "n": 3.0}], seed=1)
    start = state.params.stacked()  # (4, 3): two factors and the bias
    rng = np.random.default_rng(2)
    # the clients' local models of the items they trained, and their rows per item
    # item 2 has one row: a weight of 1 moves it as any other
    local = {0: (np.array([0, 1]), np.array([2, 5])), 1: (np.array([1, 2]), np.array([1, 1]))}
    models = {c: start[items] + rng.normal(size=(items.size, 3)) for c, (items, _) in local.items()}
    updates = [
        ClientUpdate(c, items, counts, {"delta": models[c] - start[items]})
        for c, (items, counts) in local.items()
    ]

    after = server_update(state, updates, config).params.stacked()

    np.testing.assert_allclose(after[0], models[0][0], rtol=1e-12)
    np.testing.assert_allclose(
        after[1], np.average([models[0][1], models[1][0]], axis=0, weights=[5, 1]), rtol=1e-12
    )
    np.testing.assert_allclose(after[2], models[1][1], rtol=1e-12)
    np.testing.assert_array_equal(after[3], start[3])  # nobody trained it
    assert config.effective_server_lr == 1.0


def test_the_smallest_settings_are_accepted_and_the_bounds_refused():
    MFConfig(n_factors=1, local_epochs=1, batch_size=1, top_k=1)
    MFConfig(algorithm="fedavg", server_lr=0.5)
    for name in ("n_factors", "local_epochs", "batch_size", "top_k"):
        with pytest.raises(ValueError, match=f"{name}=0 must be >= 1"):
            MFConfig(**{name: 0})
    for name in ("reg", "local_lr", "init_std"):
        with pytest.raises(ValueError, match=rf"{name}=0\.0 must be > 0"):
            MFConfig(**{name: 0.0})
    with pytest.raises(ValueError, match=r"server_lr=0\.0 must be > 0"):
        MFConfig(algorithm="fedavg", server_lr=0.0)


def test_the_starting_mean_is_the_clients_mean_or_under_dp_the_scales_middle():
    sums = [{"rating_sum": 7.0, "n": 2.0}, {"rating_sum": 5.0, "n": 2.0}]
    assert init_global_state(3, MFConfig(), sums, seed=0).params.global_mean == 3.0
    assert (
        init_global_state(3, MFConfig(), [{"rating_sum": 0.0, "n": 0.0}], 0).params.global_mean == 0
    )
    dp = UserLevelDP(noise_multiplier=1.0, max_items=5)
    private = MFConfig(dp=dp, clip_to=(1.0, 5.0))
    assert init_global_state(3, private, sums, seed=0).params.global_mean == 3.0  # (1 + 5) / 2
    skewed = [{"rating_sum": 9.0, "n": 2.0}]  # a data mean of 4.5 must not leak into the start
    assert init_global_state(3, private, skewed, seed=0).params.global_mean == 3.0
    assert init_global_state(3, MFConfig(dp=dp), skewed, seed=0).params.global_mean == 0.0


def _dense_sum(updates, n_items, config):
    return from_dense_sum(sum(to_dense(u, n_items, config) for u in updates), n_items, config)


def test_the_secure_encoding_sums_to_the_updates_combined_by_hand():
    """ALS statistics add per item; FedAvg's deltas come back as their count-weighted mean; an
    update without training metrics adds none; only touched items come back."""
    rng = np.random.default_rng(3)
    n_items, k1 = 6, 3  # two factors and the bias
    items = [np.array([0, 2]), np.array([2, 4])]
    counts = [np.array([2, 1]), np.array([3, 1])]  # item 4: one row, summed like any other
    als = MFConfig(n_factors=2)
    updates = [
        ClientUpdate(
            c,
            items[c],
            counts[c],
            {"gram": rng.normal(size=(2, k1 * (k1 + 1) // 2)), "rhs": rng.normal(size=(2, k1))},
            {"train_sse": 1.5, "train_n": 3.0} if c == 0 else {},
        )
        for c in range(2)
    ]
    total = _dense_sum(updates, n_items, als)
    assert total.items.tolist() == [0, 2, 4] and total.counts.tolist() == [2, 4, 1]
    for name in ("gram", "rhs"):
        a, b = updates[0].arrays[name], updates[1].arrays[name]
        np.testing.assert_allclose(total.arrays[name], [a[0], a[1] + b[0], b[1]], atol=1e-12)
    assert total.metrics == {"train_sse": 1.5, "train_n": 3.0}

    fedavg = MFConfig(algorithm="fedavg", n_factors=2)
    deltas = [rng.normal(size=(2, k1)) for _ in range(2)]
    moved = [ClientUpdate(c, items[c], counts[c], {"delta": deltas[c]}) for c in range(2)]
    total = _dense_sum(moved, n_items, fedavg)
    assert total.items.tolist() == [0, 2, 4] and total.counts.tolist() == [2, 4, 1]
    expected = [deltas[0][0], np.average([deltas[0][1], deltas[1][0]], 0, [1, 3]), deltas[1][1]]
    np.testing.assert_allclose(total.arrays["delta"], expected, atol=1e-12)
    assert total.metrics == {"train_sse": 0.0, "train_n": 0.0}


def test_a_private_runs_encodings_keep_every_item_and_the_factor_channels_width():
    rng = np.random.default_rng(4)
    n_items, k = 5, 2  # under DP the factor channel has the factors alone: width 2, packed 3
    private = MFConfig(n_factors=k, dp=UserLevelDP(noise_multiplier=1.0, max_items=5))
    every = np.arange(n_items)
    noisy = [
        ClientUpdate(
            c,
            every,
            rng.normal(size=n_items),
            {"gram": rng.normal(size=(n_items, 3)), "rhs": rng.normal(size=(n_items, k))},
        )
        for c in range(2)
    ]
    total = _dense_sum(noisy, n_items, private)
    assert total.items.tolist() == every.tolist()
    np.testing.assert_allclose(total.counts, noisy[0].counts + noisy[1].counts, atol=1e-12)
    for name in ("gram", "rhs"):
        summed = noisy[0].arrays[name] + noisy[1].arrays[name]
        np.testing.assert_allclose(total.arrays[name], summed, atol=1e-12)
    biases = [
        ClientUpdate(c, every, rng.normal(size=n_items), {"rhs": rng.normal(size=(n_items, 1))})
        for c in range(2)
    ]
    total = _dense_sum(biases, n_items, private)
    np.testing.assert_allclose(total.counts, biases[0].counts + biases[1].counts, atol=1e-12)
    summed = biases[0].arrays["rhs"] + biases[1].arrays["rhs"]
    np.testing.assert_allclose(total.arrays["rhs"], summed, atol=1e-12)


def test_the_released_popularity_is_the_noisy_count_floored_at_zero():
    config = MFConfig(
        n_factors=2, dp=UserLevelDP(noise_multiplier=1.0, max_items=5), clip_to=(1.0, 5.0)
    )
    state = init_global_state(4, config, [], seed=0)
    every = np.arange(4)
    counts = [np.array([3.0, -2.0, 0.5, -0.1]), np.array([1.0, 1.0, -1.0, 0.05])]
    updates = [ClientUpdate(c, every, counts[c], {"rhs": np.zeros((4, 1))}) for c in range(2)]
    released = server_bias_update(state, updates, config)
    np.testing.assert_allclose(released.popularity, [4.0, 0.0, 0.0, 0.0])


def test_the_training_split_is_evaluated_for_its_error_only():
    data = low_rank_interactions(n_users=30, n_items=20, density=0.4, seed=5)
    owner = assign_clients(data, n_clients=1, strategy="iid", rng=np.random.default_rng(0))
    split = split_rows(data, method="random", valid_fraction=0.2, test_fraction=0.0)
    (client,) = build_clients(data, owner, split)
    config = MFConfig(n_factors=2)
    state = init_global_state(data.n_items, config, [{"rating_sum": 90.0, "n": 30.0}], seed=0)
    out = evaluate_client_splits(client, state.params, config, ("train", "valid"), ranking=True)
    assert out["train"][1] is None and "ndcg" not in out["train"][0]
    assert out["train"][0]["n"] == len(client.rows("train"))
    assert out["valid"][1] is not None and "ndcg" in out["valid"][0]
