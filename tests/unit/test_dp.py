"""User-level DP: the sensitivity bound holds, the noise has the calibrated scale, the accountant
is inverted correctly, and utility degrades gracefully with epsilon."""

from dataclasses import replace

import numpy as np
import pytest

from models.mf.als import RatingRows, UserParams
from models.privacy.dp import (
    UserLevelDP,
    calibrate,
    clipped_implicit_statistics,
    clipped_statistics,
    epsilon,
    limit_items,
    noisy_dense,
)


def _dense(stats, n_items):
    k = stats.rhs.shape[1]
    out = np.zeros((n_items, 1 + stats.grams.shape[1] + k))
    out[stats.items] = np.column_stack([stats.counts, stats.grams, stats.rhs])
    return out.ravel()


def test_one_users_contribution_stays_within_the_sensitivity():
    rng = np.random.default_rng(0)
    dp = UserLevelDP(noise_multiplier=1.0, max_items=5, factor_clip=1.0, residual_clip=2.0)
    n_items, k = 12, 3
    users = UserParams(rng.normal(0, 10, (3, k)), rng.normal(0, 3, 3))  # big on purpose: clipped
    items = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 9])
    owner = np.array([0] * 8 + [1] * 4)
    ratings = rng.uniform(-50, 50, items.size)
    both = limit_items(RatingRows(owner, items, ratings, n_users=3, n_items=n_items), 5, rng)
    without = RatingRows(both.users[both.users == 1], both.items[both.users == 1],
                         both.ratings[both.users == 1], n_users=3, n_items=n_items)  # fmt: skip

    change = _dense(clipped_statistics(both, users, 3.0, dp), n_items) - _dense(
        clipped_statistics(without, users, 3.0, dp), n_items
    )
    assert np.bincount(both.users)[0] == 5  # user 0 was cut to max_items rows
    assert np.linalg.norm(change) <= dp.sensitivity + 1e-9
    assert np.linalg.norm(change) > 0.5 * dp.sensitivity  # the bound is not vacuous here


def test_noise_has_the_calibrated_scale_on_every_item():
    from models.mf.als import ItemStatistics

    dp = UserLevelDP(noise_multiplier=2.0, max_items=4, shares=4)
    stats = ItemStatistics(np.array([1]), np.array([3]), np.zeros((1, 6)), np.zeros((1, 3)))
    noisy = noisy_dense(stats, 2000, dp.noise_std(dp.sensitivity), np.random.default_rng(0))

    assert noisy.items.tolist() == list(range(2000))  # untouched items get noise too
    expected = 2.0 * dp.sensitivity / 2  # sqrt(4 shares)
    assert np.std(noisy.grams) == pytest.approx(expected, rel=0.02)


def test_calibration_inverts_the_accountant():
    delta = 1e-5
    sigma = calibrate(4.0, sampling_rate=1.0, rounds=10, delta=delta)
    assert epsilon(sigma, 1.0, 10, delta) <= 4.0
    assert epsilon(sigma * 0.97, 1.0, 10, delta) > 4.0  # and it is the smallest such noise
    assert epsilon(sigma, 0.5, 10, delta) < 4.0  # sampling clients amplifies privacy
    assert epsilon(2 * sigma, 1.0, 10, delta) < epsilon(sigma, 1.0, 10, delta)


def test_one_users_implicit_contribution_stays_within_the_sensitivity():
    rng = np.random.default_rng(1)
    dp, alpha, n_items, k = UserLevelDP(1.0, max_items=5, factor_clip=0.7), 2.0, 12, 3
    factors = rng.normal(0, 10, (3, k))  # big on purpose: clipped
    items = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 9])
    owner = np.array([0] * 8 + [1] * 4)
    both = limit_items(RatingRows(owner, items, np.ones(items.size), n_users=3, n_items=n_items),
                       5, rng)  # fmt: skip
    mine = both.users == 0
    without = RatingRows(both.users[~mine], both.items[~mine], both.ratings[~mine],
                         n_users=3, n_items=n_items)  # fmt: skip
    absent = factors.copy()
    absent[0] = 0.0  # a user with no rows folds in to a zero factor

    def released(rows, x):
        stats, user_gram = clipped_implicit_statistics(rows, x, alpha, dp)
        return np.concatenate([_dense(stats, n_items), user_gram[np.triu_indices(k)]])

    change = released(both, factors) - released(without, absent)
    bound = dp.implicit_sensitivity(alpha)
    assert np.linalg.norm(change) <= bound + 1e-9
    assert np.linalg.norm(change) > 0.5 * bound


def test_the_accountant_composes_full_releases_with_sampled_rounds():
    delta, sigma = 1e-5, 1.5
    # the same composition, up to the PLD grid's rounding of a different order of composing
    assert epsilon(sigma, 1.0, 5, delta, full=1) == pytest.approx(
        epsilon(sigma, 1.0, 6, delta), rel=1e-4
    )
    # a release from every client is not amplified by sampling: it costs more than a round
    assert epsilon(sigma, 0.3, 5, delta, full=1) > epsilon(sigma, 0.3, 6, delta)
    assert epsilon(calibrate(4.0, 0.3, 5, delta, full=1), 0.3, 5, delta, full=1) <= 4.0


def test_dp_implicit_als_trades_ranking_quality_for_privacy():
    from models.data.partitions import build_clients
    from models.data.sharding import assign_clients, split_rows
    from models.data.synthetic import generate_synthetic
    from models.ranking.federated import RankingConfig, run_two_stage

    data = generate_synthetic(n_users=2000, n_items=100, n_interactions=60_000, seed=3)
    data = type(data)(data.frame.assign(rating=1.0), data.user_ids, data.item_ids)
    rng = np.random.default_rng(0)
    owner = assign_clients(data, n_clients=5, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.0, test_fraction=0.2)
    clients = build_clients(data, owner, split)
    base = RankingConfig(n_factors=4, reg=50.0, ranker=None)

    def ndcg(config):
        result = run_two_stage(clients, data.n_items, config, rounds=3, eval_splits=("test",))
        return result.history[-1]["test/ndcg_at_10"], result.recommender.retrieval

    sigma = calibrate(8.0, 1.0, 3, 1 / data.n_users)
    private = UserLevelDP.for_implicit(sigma, max_items=30, shares=5)
    (plain, _), (loose, retrieval), (tight, _) = (
        ndcg(base),
        ndcg(replace(base, dp=private)),
        ndcg(replace(base, dp=replace(private, noise_multiplier=50 * sigma))),
    )
    # epsilon 8 keeps most of the quality here (the extra ridge regularises too, so it can come
    # out a hair either side of the plain run); 50x the noise loses it
    assert loose > 0.9 * plain
    assert tight < loose - 0.1
    assert retrieval.similarity is None  # no kNN under DP: it has no mechanism
    assert retrieval.popularity.min() >= 0.0  # noisy counts, floored


def test_dp_als_trades_accuracy_for_privacy():
    from models.data.partitions import build_clients
    from models.data.sharding import assign_clients, split_rows
    from models.data.synthetic import generate_synthetic
    from models.mf.federated import MFConfig, run_federated

    data = generate_synthetic(n_users=1500, n_items=150, n_interactions=45_000, seed=1)
    rng = np.random.default_rng(0)
    owner = assign_clients(data, n_clients=5, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.0, test_fraction=0.2)
    clients = build_clients(data, owner, split)
    base = MFConfig(n_factors=4, reg=0.1, clip_to=data.rating_scale)

    def rmse(config):
        _, history = run_federated(
            clients, data.n_items, config, rounds=5, eval_splits=("test",), eval_ranking=False
        )
        return history[-1].metrics["test/rmse"]

    private = UserLevelDP(noise_multiplier=calibrate(8.0, 1.0, 5, 1 / 1500), max_items=20, shares=5)
    plain, loose, tight = (
        rmse(base),
        rmse(replace(base, dp=private)),
        rmse(replace(base, dp=replace(private, noise_multiplier=50 * private.noise_multiplier))),
    )
    assert plain < loose < tight
    assert loose < 1.15 * plain


def test_noisy_dense_adds_the_statistics_to_the_noise():
    from models.mf.als import ItemStatistics

    rng = np.random.default_rng(3)
    stats = ItemStatistics(
        np.array([1, 3]), np.array([2, 5]), rng.normal(size=(2, 6)), rng.normal(size=(2, 3))
    )
    empty = ItemStatistics(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 6)), np.zeros((0, 3)))

    exact = noisy_dense(stats, 4, 0.0, np.random.default_rng(0))
    noisy, noise = (noisy_dense(s, 4, 1.5, np.random.default_rng(9)) for s in (stats, empty))

    assert exact.items.tolist() == [0, 1, 2, 3] and exact.counts.tolist() == [0, 2, 0, 5]
    np.testing.assert_array_equal(exact.grams[[1, 3]], stats.grams)
    np.testing.assert_array_equal(exact.rhs[[1, 3]], stats.rhs)
    assert not exact.grams[[0, 2]].any() and not exact.rhs[[0, 2]].any()
    # the same noise draw with and without the statistics: the difference is the statistics
    np.testing.assert_allclose(noisy.counts - noise.counts, exact.counts, atol=1e-12)
    np.testing.assert_allclose(noisy.grams - noise.grams, exact.grams, atol=1e-12)
    np.testing.assert_allclose(noisy.rhs - noise.rhs, exact.rhs, atol=1e-12)


def test_the_documented_clipping_bounds_and_their_sensitivity():
    import math

    dp = UserLevelDP(noise_multiplier=1.0)

    # README: at most 100 items per user, factor norm clipped to 0.5, residual to [-2, 2]
    assert (dp.max_items, dp.factor_clip, dp.residual_clip) == (100, 0.5, 2.0)
    x2 = 0.5**2 + 1.0  # |[x, 1]|^2 at the clip
    per_item = x2**2 + 2.0**2 * x2 + 1.0  # |x x^T|_F^2 + |r x|^2 + count^2
    assert dp.sensitivity == pytest.approx(math.sqrt(100 * per_item))


def test_clipped_statistics_equal_the_plain_ones_when_nothing_is_clipped():
    from models.mf.als import item_statistics

    rng = np.random.default_rng(11)
    dp = UserLevelDP(noise_multiplier=1.0, max_items=10, factor_clip=10.0, residual_clip=100.0)
    people = UserParams(rng.normal(0, 0.1, (3, 2)), rng.normal(0, 0.1, 3))
    rows = RatingRows(np.array([0, 0, 1, 2]), np.array([1, 2, 1, 0]), rng.uniform(1, 5, 4),
                      n_users=3, n_items=3)  # fmt: skip

    clipped, plain = clipped_statistics(rows, people, 3.0, dp), item_statistics(rows, people, 3.0)

    np.testing.assert_array_equal(clipped.items, plain.items)
    np.testing.assert_allclose(clipped.grams, plain.grams)
    np.testing.assert_allclose(clipped.rhs, plain.rhs)


def test_the_documented_noise_split_and_count_floor():
    dp = UserLevelDP(noise_multiplier=2.0)
    assert dp.shares == 1 and dp.count_floor == 4.0  # README: below 4 deviations, zeroed
    assert UserLevelDP.for_implicit(2.0, max_items=5, shares=3).ridge_scale == 4.0  # 4 deep
    assert dp.noise_std(3.0) == pytest.approx(2.0 * 3.0)
    assert UserLevelDP(2.0, shares=4).noise_std(3.0) == pytest.approx(2.0 * 3.0 / 2)


def _one_user_removed(rng, n_items=12):
    """Rows of users 0 and 1 (user 0 rates every item, far past max_items; one rating per user
    and item, as the data holds) and the same without user 0."""
    items = np.concatenate([np.arange(n_items), [0, 1, 2, 9]])
    owner = np.array([0] * n_items + [1] * 4)
    ratings = rng.choice([-50.0, 50.0], items.size)  # far past the clip on purpose
    both = RatingRows(owner, items, ratings, n_users=3, n_items=n_items)
    mine = owner == 0
    without = RatingRows(owner[~mine], items[~mine], ratings[~mine], n_users=3, n_items=n_items)
    return both, without


def test_one_users_bias_channel_stays_within_its_sensitivity():
    from models.privacy.dp import clipped_bias_sums

    both, without = _one_user_removed(np.random.default_rng(4))
    dp = UserLevelDP(noise_multiplier=1.0, max_items=5, residual_clip=2.0)

    change = np.concatenate(clipped_bias_sums(both, 3.0, dp)) - np.concatenate(
        clipped_bias_sums(without, 3.0, dp)
    )

    assert np.linalg.norm(change) <= dp.bias_sensitivity + 1e-9
    # user 0 has 12 rows at weight sqrt(5/12) and every residual at the clip: the bound is met
    assert np.linalg.norm(change) == pytest.approx(dp.bias_sensitivity, rel=1e-9)
    assert dp.bias_sensitivity == pytest.approx(np.sqrt(5 * (2.0**2 + 1)))


def test_one_users_factor_channel_stays_within_its_sensitivity():
    from models.privacy.dp import clipped_factor_statistics

    rng = np.random.default_rng(5)
    both, without = _one_user_removed(rng)
    dp = UserLevelDP(noise_multiplier=1.0, max_items=5, factor_clip=0.8, residual_clip=1.5)
    users = UserParams(rng.normal(0, 10, (3, 3)), rng.normal(0, 3, 3))  # clipped
    bias = rng.normal(0, 1, 12)
    absent = UserParams(users.factors.copy(), users.bias.copy())
    absent.factors[0] = 0.0  # a user without rows folds in to zero

    change = _dense(clipped_factor_statistics(both, users, 3.0, bias, dp), 12) - _dense(
        clipped_factor_statistics(without, absent, 3.0, bias, dp), 12
    )

    assert np.linalg.norm(change) <= dp.factor_sensitivity + 1e-9
    assert np.linalg.norm(change) > 0.5 * dp.factor_sensitivity


def test_released_biases_are_the_shrunk_item_means_and_rare_items_fall_to_zero():
    from models.privacy.dp import released_biases

    dp = UserLevelDP(noise_multiplier=0.0, bias_reg=5.0)
    counts = np.array([1000.0, 1000.0, 2.0, -3.0])  # the last: a noisy count below zero
    sums = np.array([500.0, -500.0, 4.0, 1.0])  # residuals of r - 3

    mean, bias = released_biases(counts, sums, 3.0, dp)

    assert mean == pytest.approx(3.0 + 5.0 / 1999.0)
    shift = 5.0 / 1999.0
    assert bias[0] == pytest.approx((500 - shift * 1000) / (1000 + 5))
    assert bias[2] == pytest.approx((4 - shift * 2) / (2 + 5))
    assert bias[3] == pytest.approx((1 + shift * 3) / 5)  # no negative count in the denominator
    noisy = released_biases(counts, sums, 3.0, replace(dp, noise_multiplier=1.0))[1]
    # the noise's variance adds shrinkage that falls with the count: rare items shrink far more
    assert abs(noisy[2]) < 0.1 * abs(bias[2]) and noisy[0] == pytest.approx(bias[0], rel=0.05)


def test_private_factors_from_an_indefinite_noisy_gram_stay_finite_and_rare_items_get_none():
    from models.mf.als import ItemStatistics
    from models.mf.linalg import pack_symmetric
    from models.privacy.dp import solve_private_factors

    gram = np.array([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and -2: noise made it indefinite
    stats = ItemStatistics(
        np.array([0, 1]), np.array([50.0, 0.5]), pack_symmetric(np.stack([gram, gram])),
        np.array([[1.0, -1.0], [1.0, 1.0]]),
    )  # fmt: skip

    def solve(psd):
        return solve_private_factors(
            np.ones((2, 2)), stats, reg=0.0, extra_ridge=1.0, floor=1.0, psd=psd
        )

    # the right-hand side lies along the eigenvector of -2: projected, that eigenvalue is 0 and
    # the ridge 1 gives (1, -1); unprojected, -2 + 1 flips the sign
    np.testing.assert_allclose(solve(True)[0], [1.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(solve(False)[0], [-1.0, 1.0], atol=1e-12)
    assert solve(True)[1].tolist() == [0.0, 0.0]  # below the floor: served by its bias


def test_the_private_biases_phase_is_one_of_the_accounted_rounds_and_survives_secure_encoding():
    from models.client import ClientData  # noqa: F401  (the phase runs on a client)
    from models.data.partitions import build_clients
    from models.data.sharding import assign_clients, split_rows
    from models.data.synthetic import generate_synthetic
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig

    dp = UserLevelDP(noise_multiplier=1.0, max_items=10, shares=2)
    family = ExplicitMF(MFConfig(n_factors=2, dp=dp, clip_to=(1.0, 5.0)))
    phases = family.phases(3)
    assert [(p.name, p.rounds, p.everyone) for p in phases] == [
        ("biases", 1, False),
        ("train", 2, False),
    ]  # fmt: skip  (no release outside the 3 sampled rounds the accountant counts)

    data = generate_synthetic(n_users=60, n_items=20, n_interactions=500, seed=1)
    rng = np.random.default_rng(0)
    owner = assign_clients(data, n_clients=2, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.0, test_fraction=0.2)
    clients = build_clients(data, owner, split)
    state = family.initial_state(data.n_items, 0)
    updates = [
        family.client_round(c, state, "biases", np.random.default_rng(i), ())[0]
        for i, c in enumerate(clients)
    ]
    assert all(not u.metrics for u in updates)  # nothing but the noised channel leaves
    dense = sum(family.to_dense(u, data.n_items) for u in updates)
    summed = family.from_dense_sum(dense, data.n_items)
    direct, secure = (family.server_update(state, x, "biases") for x in (updates, [summed]))
    np.testing.assert_allclose(secure.params.bias, direct.params.bias, atol=1e-12)
    assert secure.params.global_mean == pytest.approx(direct.params.global_mean)
    assert 2.5 < direct.params.global_mean < 4.5
    # the private trivial baseline is that release (nothing more is released for it): a noisy
    # model must beat the released biases, not the middle of the scale
    np.testing.assert_array_equal(secure.baseline, secure.params.bias)
    test = clients[0].rows("test")
    oracle = np.clip(secure.params.global_mean + secure.params.bias[test.items], 1.0, 5.0)
    sums = family.evaluate(clients[0], secure, ["test"])["baseline/test"][0]
    assert sums["sse"] == pytest.approx(float(np.sum((oracle - test.ratings) ** 2)))
    middle = float(np.sum((3.0 - test.ratings) ** 2))
    assert sums["sse"] < middle  # the bar the gate used to set: the scale's middle


def test_a_private_run_has_its_own_defaults_unless_given():
    from fedrec.config import TrainingConfig
    from models.privacy.dp import PRIVATE_EXPLICIT, SECURE_PRIVATE_QUORUM

    private = TrainingConfig(dp_epsilon=8.0, secure_aggregation=True)
    assert (private.rounds, private.dp_max_items) == (
        PRIVATE_EXPLICIT.rounds,
        PRIVATE_EXPLICIT.max_items,
    )
    assert private.mf_config().n_factors == PRIVATE_EXPLICIT.n_factors
    assert (private.min_clients, private.min_fraction) == (2, SECURE_PRIVATE_QUORUM)
    given = TrainingConfig(dp_epsilon=8.0, rounds=4, factors=8, dp_max_items=30, min_fraction=0.5)
    assert (given.rounds, given.mf_config().n_factors, given.dp_max_items, given.min_fraction) == (
        4, 8, 30, 0.5,
    )  # fmt: skip
    plain = TrainingConfig()
    assert (plain.rounds, plain.mf_config().n_factors, plain.min_fraction) == (10, 32, 0.0)
    assert TrainingConfig(**private.model_dump()) == private  # a dumped config keeps its values


def test_the_factor_channel_is_the_weighted_sums_written_out():
    from models.mf.linalg import unpack_symmetric
    from models.privacy.dp import clipped_factor_statistics

    rng = np.random.default_rng(12)
    dp = UserLevelDP(noise_multiplier=1.0, max_items=2, factor_clip=10.0, residual_clip=100.0)
    people = UserParams(rng.normal(0, 0.1, (2, 2)), rng.normal(0, 0.1, 2))
    users, items = np.array([0, 0, 0, 0, 1]), np.array([0, 1, 2, 1, 1])
    ratings, item_bias = rng.uniform(1, 5, 5), rng.normal(0, 0.1, 3)
    rows = RatingRows(users, items, ratings, n_users=2, n_items=3)

    stats = clipped_factor_statistics(rows, people, 3.0, item_bias, dp)

    weight = {0: np.sqrt(2 / 4), 1: 1.0}  # min(1, sqrt(max_items / rows of the user))
    assert stats.items.tolist() == [0, 1, 2]  # every rated item, each once
    for j, item in enumerate(stats.items):
        gram, rhs, count = np.zeros((2, 2)), np.zeros(2), 0.0
        for u, i, r in zip(users, items, ratings, strict=True):
            if i == item:
                p, t = people.factors[u], r - 3.0 - people.bias[u] - item_bias[i]
                gram += weight[u] * np.outer(p, p)
                rhs += weight[u] * t * p
                count += weight[u]
        np.testing.assert_allclose(unpack_symmetric(stats.grams[j : j + 1], 2)[0], gram)
        np.testing.assert_allclose(stats.rhs[j], rhs)
        assert stats.counts[j] == pytest.approx(count)


@pytest.mark.parametrize("target", [0.0, -1.0])
def test_calibration_refuses_a_target_epsilon_that_is_not_positive(target):
    with pytest.raises(ValueError, match="must be > 0"):
        calibrate(target, sampling_rate=1.0, rounds=3, delta=1e-5)


def test_the_implicit_sensitivity_at_the_clip():
    import math

    from models.privacy.dp import noisy_gram

    dp = UserLevelDP(1.0, max_items=7, factor_clip=0.7)
    c2, alpha = 0.49, 2.0  # |x|^2 at the clip
    # per item: |alpha x x^T|_F^2 + |(1 + alpha) x|^2 + 1; plus the user's own |x x^T|_F^2
    want = math.sqrt(7 * ((alpha * c2) ** 2 + (1 + alpha) ** 2 * c2 + 1) + c2**2)
    assert dp.implicit_sensitivity(alpha) == pytest.approx(want)
    noisy = noisy_gram(np.eye(3), 0.5, np.random.default_rng(0))
    np.testing.assert_array_equal(noisy, noisy.T)  # the noise is mirrored: still symmetric
    assert not np.allclose(noisy, np.eye(3))


def test_only_an_epsilon_above_ten_is_called_weak():
    from models.privacy.dp import weak_guarantee

    assert weak_guarantee(1.0) is None and weak_guarantee(10.0) is None
    said = weak_guarantee(10.5)
    assert said is not None and said.startswith("epsilon 10.5 is a weak guarantee")
    assert f"(about {np.exp(10.5):.2g})" in said
    assert "up to e^1e+06; above 10" in weak_guarantee(1e6)  # no overflowed "about" figure
