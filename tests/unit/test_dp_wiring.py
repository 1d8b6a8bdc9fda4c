"""The DP mechanisms are wired as calibrated, against oracles that do not share their code: every
released array of :func:`noisy_dense`, :func:`noisy_gram`, the explicit-MF bias phase and the
implicit-ALS client round carries Gaussian noise whose sample deviation (``np.std`` of the upload
minus the exact statistics) is the one :meth:`UserLevelDP.noise_std` gives for the mechanism's own
sensitivity; a user's rows are cut to ``max_items`` before they enter the implicit sums. Also the
small wiring around them: the worst-client metric's direction, the size of a sampled round
(``ceil``), and the ``min_clients`` mask of ``norm_clip``.

The statistical checks use thousands of values and a fixed seed: a 5-10% tolerance is several
standard errors wide, while a miswiring (another sensitivity, a channel left without noise)
is off by 40% or more."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.client import SPLIT, TRAIN, ClientData
from models.data.schema import ITEM, RATING, USER
from models.federation.sampling import sample_clients
from models.mf.als import ItemStatistics, RatingRows
from models.mf.federated import client_bias_update
from models.mf.implicit import solve_users_implicit
from models.mf.params import ItemParams
from models.privacy.dp import (
    UserLevelDP,
    clip_rows,
    clipped_bias_sums,
    clipped_implicit_statistics,
    noisy_dense,
    noisy_gram,
)
from models.promotion import worst_client_metric
from models.ranking.federated import RankingConfig, implicit_client_round
from models.robust import aggregate_robust


def _train_client(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_items: int):
    frame = pd.DataFrame(
        {USER: users, ITEM: items, RATING: ratings, SPLIT: np.full(users.size, TRAIN)}
    )
    return ClientData(0, np.arange(users.max() + 1), n_items, frame)


def _random_client(n_users: int, per_user: int, n_items: int, seed: int) -> ClientData:
    """``per_user`` distinct items for each user, ratings 1..5."""
    rng = np.random.default_rng(seed)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    users = np.repeat(np.arange(n_users), per_user)
    ratings = rng.integers(1, 6, users.size).astype(np.float64)
    return _train_client(users, items, ratings, n_items)


def _dense(stats: ItemStatistics, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.zeros(n_items)
    grams = np.zeros((n_items, stats.grams.shape[1]))
    rhs = np.zeros((n_items, stats.rhs.shape[1]))
    counts[stats.items] = stats.counts
    grams[stats.items] = stats.grams
    rhs[stats.items] = stats.rhs
    return counts, grams, rhs


# --- noisy_dense / noisy_gram ----------------------------------------------------------------
def test_noisy_dense_puts_the_asked_deviation_on_counts_grams_and_rhs_each():
    dp = UserLevelDP(noise_multiplier=1.5, max_items=4, shares=3)
    std = dp.noise_std(dp.sensitivity)
    empty = ItemStatistics(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 6)), np.zeros((0, 3)))
    noisy = noisy_dense(empty, 5000, std, np.random.default_rng(0))

    assert noisy.items.tolist() == list(range(5000))
    for name in ("counts", "grams", "rhs"):
        assert np.std(getattr(noisy, name)) == pytest.approx(std, rel=0.05), name


def test_noisy_gram_is_symmetric_with_the_asked_deviation_on_the_diagonal_and_above_it():
    rng = np.random.default_rng(1)
    k, draws, std = 120, 100, 0.7
    base = rng.normal(0, 3, (k, k))
    gram = base + base.T
    upper = np.triu_indices(k, 1)
    diagonal, above = [], []
    for _ in range(draws):
        noisy = noisy_gram(gram, std, rng)
        np.testing.assert_array_equal(noisy, noisy.T)
        noise = noisy - gram
        diagonal.append(np.diag(noise))
        above.append(noise[upper])

    assert np.concatenate(diagonal).size == 12000
    assert np.std(np.concatenate(diagonal)) == pytest.approx(std, rel=0.05)
    assert np.std(np.concatenate(above)) == pytest.approx(std, rel=0.05)


# --- explicit MF: the biases phase -------------------------------------------------------------
def test_bias_phase_noises_counts_and_sums_at_the_bias_channels_deviation():
    n_items = 5000
    dp = UserLevelDP(noise_multiplier=1.2, max_items=6, shares=2)
    client = _random_client(n_users=40, per_user=9, n_items=n_items, seed=2)
    params = ItemParams(np.zeros((n_items, 4)), np.zeros(n_items), 3.5)
    exact_counts, exact_sums = clipped_bias_sums(client.rows("train"), 3.5, dp)

    update = client_bias_update(client, params, dp, np.random.default_rng(3))

    std = dp.noise_std(dp.bias_sensitivity)
    # the other channel's sensitivity is far enough off for the check to tell them apart
    assert abs(dp.noise_std(dp.factor_sensitivity) / std - 1) > 0.3
    assert update.items.tolist() == list(range(n_items))
    for noise in (update.counts - exact_counts, update.arrays["rhs"][:, 0] - exact_sums):
        assert np.std(noise) == pytest.approx(std, rel=0.05)
        assert abs(np.mean(noise)) < 4 * std / np.sqrt(n_items)  # centred: 4 standard errors


def test_a_private_explicit_round_sends_its_clipped_factor_channel_noised_and_no_metrics():
    """The factor channel leaves only noised (every item, at the channel's own deviation, centred
    on the clipped statistics) and without the training error, which the accountant does not
    count."""
    from models.mf.als import solve_users
    from models.mf.federated import MFConfig, client_update
    from models.privacy.dp import clipped_factor_statistics

    n_items = 4000
    dp = UserLevelDP(noise_multiplier=1.2, max_items=6, shares=2)
    config = MFConfig(n_factors=2, dp=dp, clip_to=(1.0, 5.0))
    client = _random_client(n_users=40, per_user=9, n_items=n_items, seed=4)
    rng = np.random.default_rng(5)
    params = ItemParams(rng.normal(0, 0.1, (n_items, 2)), rng.normal(0, 0.1, n_items), 3.0)
    rows = client.rows("train")
    users = solve_users(rows, params, reg=config.reg)
    exact = clipped_factor_statistics(rows, users, params.global_mean, params.bias, dp)
    counts, grams, rhs = _dense(exact, n_items)

    update = client_update(client, params, config, np.random.default_rng(6))

    assert update.metrics == {} and update.items.tolist() == list(range(n_items))
    std = dp.noise_std(dp.factor_sensitivity)
    for noise in (
        update.counts - counts,
        (update.arrays["gram"] - grams).ravel(),
        (update.arrays["rhs"] - rhs).ravel(),
    ):
        assert np.std(noise) == pytest.approx(std, rel=0.05)
        assert abs(np.mean(noise)) < 4 * std / np.sqrt(noise.size)


# --- implicit ALS: the client round -------------------------------------------------------------
def _implicit_exact(client: ClientData, item_factors: np.ndarray, config: RankingConfig):
    """The client's clipped statistics without noise (every user within ``max_items``, so the
    sampling keeps every row) and its exact ``x^T x`` over its clipped user factors."""
    rows = client.rows("train")
    binary = RatingRows(rows.users, rows.items, np.ones(len(rows)),
                        n_users=rows.n_users, n_items=rows.n_items)  # fmt: skip
    users = solve_users_implicit(
        binary, ItemParams(item_factors, np.zeros(len(item_factors)), 0.0),
        reg=config.reg, alpha=config.alpha,
    )  # fmt: skip
    stats, user_gram = clipped_implicit_statistics(binary, users.factors, config.alpha, config.dp)
    x = clip_rows(users.factors, config.dp.factor_clip)
    np.testing.assert_allclose(user_gram, x.T @ x)
    return stats, x.T @ x


def test_implicit_round_noises_every_upload_at_the_implicit_sensitivity():
    n_items, k, alpha = 2000, 24, 10.0
    dp = UserLevelDP(noise_multiplier=1.3, max_items=10, shares=2)
    config = RankingConfig(n_factors=k, alpha=alpha, ranker=None, dp=dp)
    client = _random_client(n_users=30, per_user=8, n_items=n_items, seed=4)
    item_factors = np.random.default_rng(5).normal(0, 0.3, (n_items, k))
    stats, exact_gram = _implicit_exact(client, item_factors, config)
    counts, grams, rhs = _dense(stats, n_items)
    std = dp.noise_std(dp.implicit_sensitivity(alpha))
    # the explicit channels' sensitivities are far enough off for the check to tell them apart
    for other in (dp.sensitivity, dp.factor_sensitivity, dp.bias_sensitivity):
        assert abs(dp.noise_std(other) / std - 1) > 0.5

    upper = np.triu_indices(k)
    spread = {"counts": [], "gram": [], "rhs": [], "user_gram": []}
    for seed in range(6):
        update, _ = implicit_client_round(
            client, item_factors, config, rng=np.random.default_rng(seed)
        )
        assert update.items.tolist() == list(range(n_items))
        user_gram = update.arrays["user_gram"]
        np.testing.assert_array_equal(user_gram, user_gram.T)
        assert not np.allclose(user_gram, exact_gram)
        spread["counts"].append(update.counts - counts)
        spread["gram"].append((update.arrays["gram"] - grams).ravel())
        spread["rhs"].append((update.arrays["rhs"] - rhs).ravel())
        spread["user_gram"].append((user_gram - exact_gram)[upper])

    assert np.concatenate(spread["user_gram"]).size == 6 * k * (k + 1) // 2
    for name, values in spread.items():
        assert np.std(np.concatenate(values)) == pytest.approx(std, rel=0.06), name


def test_implicit_round_lets_at_most_max_items_of_a_users_rows_into_the_sums():
    n_items, k, alpha, max_items = 60, 4, 2.0, 4
    dp = UserLevelDP(noise_multiplier=0.0, max_items=max_items)  # no noise: the exact upload
    config = RankingConfig(n_factors=k, alpha=alpha, ranker=None, dp=dp)
    item_factors = np.random.default_rng(6).normal(0, 0.3, (n_items, k))
    # user 0 rated 40 items, user 1 three
    users = np.array([0] * 40 + [1] * 3)
    items = np.concatenate([np.arange(40), [50, 51, 52]])
    both = _train_client(users, items, np.ones(users.size), n_items)
    alone = _train_client(np.zeros(3, np.int64), np.array([50, 51, 52]), np.ones(3), n_items)

    with_user, _ = implicit_client_round(both, item_factors, config, rng=np.random.default_rng(7))
    without, _ = implicit_client_round(alone, item_factors, config, rng=np.random.default_rng(7))

    # max_items of user 0's 40 items, each once, and all of user 1's three
    assert np.isin(with_user.counts[:40], (0.0, 1.0)).all()
    assert with_user.counts[:40].sum() == max_items
    np.testing.assert_array_equal(with_user.counts[50:53], 1.0)
    change = np.concatenate([
        (with_user.counts - without.counts).ravel(),
        *[(with_user.arrays[a] - without.arrays[a]).ravel() for a in ("gram", "rhs", "user_gram")],
    ])  # fmt: skip
    assert np.linalg.norm(change) <= dp.implicit_sensitivity(alpha) + 1e-9


# --- promotion, sampling, robust aggregation -------------------------------------------------
def test_worst_client_is_the_largest_error_and_the_smallest_ranking_metric():
    assert worst_client_metric("valid/rmse") == "valid/client_max/rmse"
    assert worst_client_metric("valid/mae") == "valid/client_max/mae"
    assert worst_client_metric("valid/ndcg_at_10") == "valid/client_min/ndcg_at_10"
    assert worst_client_metric("test/recall_at_10") == "test/client_min/recall_at_10"


def test_a_sampled_round_rounds_its_size_up():
    for n, fraction in ((10, 0.25), (7, 0.5), (3, 0.1)):
        expected = int(np.ceil(fraction * n))
        chosen = sample_clients(n, fraction, seed=0, round_=1)
        assert chosen.size == expected, (n, fraction)
        assert np.unique(chosen).size == expected and chosen.min() >= 0 and chosen.max() < n
    assert sample_clients(10, 0.25, seed=0, round_=1).size == 3


def test_norm_clip_leaves_alone_an_item_fewer_than_min_clients_touched():
    # item 0: all three clients; item 1: one client. No update is clipped (factor 10).
    parts = [
        (np.array([0, 1]), np.array([[1.0, 2.0], [5.0, 5.0]]), np.array([2.0, 3.0])),
        (np.array([0]), np.array([[3.0, 0.0]]), np.array([1.0])),
        (np.array([0]), np.array([[2.0, 1.0]]), np.array([4.0])),
    ]
    average, weight = aggregate_robust(parts, 2, "norm_clip", clip_factor=10.0, min_clients=3)

    assert weight[1] == 0.0
    assert weight[0] == pytest.approx(7.0)
    expected = np.average([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]], axis=0, weights=[2.0, 1.0, 4.0])
    np.testing.assert_allclose(average[0], expected)
    # with min_clients 1, the lone client's item moves
    assert aggregate_robust(parts, 2, "norm_clip", clip_factor=10.0, min_clients=1)[1][1] == 3.0
