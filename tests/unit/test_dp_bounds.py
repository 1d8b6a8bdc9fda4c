"""User-level DP against oracles that do not share its code: the sensitivity a worst-case user
actually reaches, the released biases as a Gaussian posterior, and the accountant against the
analytic Gaussian mechanism (Balle and Wang, 2018)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from models.mf.als import ItemStatistics, RatingRows, UserParams
from models.mf.linalg import pack_symmetric, unpack_symmetric
from models.privacy.dp import (
    UserLevelDP,
    calibrate,
    clipped_bias_sums,
    clipped_factor_statistics,
    clipped_implicit_statistics,
    clipped_statistics,
    epsilon,
    limit_items,
    noisy_gram,
    released_biases,
    solve_private_factors,
    user_weights,
)

DELTA = 1e-5


def _dense(stats, n_items):
    k = stats.rhs.shape[1]
    out = np.zeros((n_items, 1 + stats.grams.shape[1] + k))
    out[stats.items] = np.column_stack([stats.counts, stats.grams, stats.rhs])
    return out.ravel()


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian release of sensitivity 1 at noise ``sigma``:
    delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma)."""

    def excess(eps: float) -> float:
        a = 1 / (2 * sigma)
        return norm.cdf(a - eps * sigma) - math.exp(eps) * norm.cdf(-a - eps * sigma) - delta

    return brentq(excess, 0.0, 200.0)


def test_a_worst_case_user_moves_the_factor_channel_by_exactly_its_sensitivity():
    n_items, k = 12, 3
    dp = UserLevelDP(noise_multiplier=1.0, max_items=5, factor_clip=0.8, residual_clip=1.5)
    # every item: 12 rows at weight sqrt(5/12), so sum w^2 = 5; a factor along one axis, so its
    # packed outer product keeps the full Frobenius norm c^2
    users, both, without = _worst_case_user(n_items, n_items, k)
    bias = np.linspace(-0.5, 0.5, n_items)

    change = _dense(clipped_factor_statistics(both, users, 3.0, bias, dp), n_items) - _dense(
        clipped_factor_statistics(without, users, 3.0, bias, dp), n_items
    )

    # by hand: sum over the user's rows of w^2 (|p p^T|^2 + t^2 |p|^2 + 1), p and t at the clips
    c, r = 0.8, 1.5
    assert np.linalg.norm(change) == pytest.approx(math.sqrt(5 * (c**4 + r**2 * c**2 + 1)))
    # the bound is the largest change a user can make, and this user makes it
    assert dp.factor_sensitivity == pytest.approx(np.linalg.norm(change), rel=1e-9)


def _worst_case_user(n_items, n_rows, k):
    """User 0: a factor along one axis far past any clip, ``n_rows`` items with ratings far
    past any residual clip; user 1: three ordinary rows. And the same rows without user 0."""
    factors = np.zeros((2, k))
    factors[0, 1] = 40.0
    factors[1] = [0.3, -0.2, 0.1][:k]
    users = UserParams(factors, np.array([0.5, -0.5]))
    items = np.concatenate([np.arange(n_rows), [0, 3, 7]])
    owner = np.array([0] * n_rows + [1] * 3)
    ratings = np.where(np.arange(items.size) % 2 == 0, 90.0, -90.0)
    both = RatingRows(owner, items, ratings, n_users=2, n_items=n_items)
    mine = owner == 0
    without = RatingRows(owner[~mine], items[~mine], ratings[~mine], n_users=2, n_items=n_items)
    return users, both, without


def test_a_worst_case_user_moves_the_plain_statistics_by_exactly_their_sensitivity():
    n_items, k = 12, 3
    dp = UserLevelDP(noise_multiplier=1.0, max_items=5, factor_clip=0.8, residual_clip=1.5)
    users, both, without = _worst_case_user(n_items, 5, k)  # exactly max_items rows

    def unpacked(stats):
        full = np.zeros((n_items, 1 + (k + 1) ** 2 + k + 1))
        grams = unpack_symmetric(stats.grams, k + 1).reshape(len(stats.items), -1)
        full[stats.items] = np.column_stack([stats.counts, grams, stats.rhs])
        return full.ravel()

    change = unpacked(clipped_statistics(both, users, 3.0, dp)) - unpacked(
        clipped_statistics(without, users, 3.0, dp)
    )

    # by hand, x = [p, 1] with |p| = c: per row |x x^T|_F^2 = |x|^4, |t x|^2 = r^2 |x|^2, and 1
    x2 = 0.8**2 + 1
    assert np.linalg.norm(change) == pytest.approx(math.sqrt(5 * (x2**2 + 1.5**2 * x2 + 1)))
    # the full (unpacked) statistics reach the bound, so it is the largest change of a user
    assert dp.sensitivity == pytest.approx(np.linalg.norm(change), rel=1e-9)


def test_a_worst_case_user_moves_the_bias_channel_by_exactly_its_sensitivity():
    dp = UserLevelDP(noise_multiplier=1.0, max_items=5, residual_clip=1.5)
    _, both, without = _worst_case_user(12, 12, 3)  # 12 rows at weight sqrt(5/12)

    change = np.concatenate(clipped_bias_sums(both, 3.0, dp)) - np.concatenate(
        clipped_bias_sums(without, 3.0, dp)
    )

    assert np.linalg.norm(change) == pytest.approx(math.sqrt(5 * (1.5**2 + 1)))
    assert dp.bias_sensitivity == pytest.approx(np.linalg.norm(change), rel=1e-9)


def test_user_weights_are_one_up_to_max_items_rows_and_shrink_past_it():
    users = np.array([0, 1, 1, 1, 2, 2])

    np.testing.assert_allclose(
        user_weights(users, 1), [1, 3**-0.5, 3**-0.5, 3**-0.5, 2**-0.5, 2**-0.5]
    )
    np.testing.assert_allclose(
        user_weights(users, 2), [1, (2 / 3) ** 0.5, (2 / 3) ** 0.5, (2 / 3) ** 0.5, 1, 1]
    )


def test_private_factors_solve_the_psd_projected_ridge_by_hand():
    # item 0: [[1, 3], [3, 1]] has eigenvalues 4 (along [1, 1]) and -2 (along [1, -1]): its
    # projection on the PSD cone is 4 * [1, 1][1, 1]^T / 2 = [[2, 2], [2, 2]]
    # item 1: positive definite, kept as it is; its noisy count 0.5 is above the floor 0.25
    # item 2: a count below the floor: zero factors
    indefinite = np.array([[1.0, 3.0], [3.0, 1.0]])
    definite = np.array([[2.0, 0.5], [0.5, 1.0]])
    stats = ItemStatistics(
        np.array([0, 1, 2]), np.array([10.0, 0.5, 0.1]),
        pack_symmetric(np.stack([indefinite, definite, definite])),
        np.array([[1.0, -2.0], [0.5, 1.0], [3.0, 3.0]]),
    )  # fmt: skip
    reg, extra = 0.3, 0.7

    out = solve_private_factors(
        np.zeros((4, 2)), stats, reg=reg, extra_ridge=extra, floor=0.25, psd=True
    )

    ridge = reg * stats.counts + extra  # a ridge of reg per count, plus the extra one
    want0 = np.linalg.solve(np.array([[2.0, 2.0], [2.0, 2.0]]) + ridge[0] * np.eye(2), stats.rhs[0])
    want1 = np.linalg.solve(definite + ridge[1] * np.eye(2), stats.rhs[1])
    np.testing.assert_allclose(out[0], want0, rtol=1e-10)
    np.testing.assert_allclose(out[1], want1, rtol=1e-10)
    assert not out[2:].any()


def test_a_positive_definite_gram_is_left_as_it_is_by_the_psd_projection():
    rng = np.random.default_rng(6)
    k, n = 3, 5
    a = rng.normal(size=(n, k, k))
    grams = a @ np.swapaxes(a, 1, 2) + np.eye(k)  # positive definite, eigenvectors not symmetric
    rhs = rng.normal(size=(n, k))
    counts = np.full(n, 20.0)
    stats = ItemStatistics(np.arange(n), counts, pack_symmetric(grams), rhs)

    out = solve_private_factors(
        np.zeros((n, k)), stats, reg=0.1, extra_ridge=0.5, floor=1.0, psd=True
    )

    for i in range(n):
        want = np.linalg.solve(grams[i] + (0.1 * 20.0 + 0.5) * np.eye(k), rhs[i])
        np.testing.assert_allclose(out[i], want, rtol=1e-9)


def test_calibration_pays_for_a_release_whose_noise_is_a_multiple_of_the_trainings():
    # one round at sigma and one release at 2 sigma are one Gaussian at 1 / sqrt(1 + 1/4) sigma
    def exact(sigma):
        return _exact_gaussian_epsilon(sigma / math.sqrt(1 + 1 / 4), DELTA)

    sigma = calibrate(1.0, 1.0, 1, DELTA, relative=(2.0,))

    assert epsilon(sigma, 1.0, 1, DELTA, extra=(2 * sigma,)) <= 1.0
    assert exact(sigma) <= 1.0 < exact(0.85 * sigma)
    assert sigma > calibrate(1.0, 1.0, 1, DELTA)  # the release costs training noise


def test_released_biases_are_each_items_gaussian_posterior_mean():
    # prior b ~ N(0, v); an item's centred noisy sum s = n b + e with Var(e) = n R v (the ratings)
    # + S^2 (the channel's noise), so E[b | s] = Cov(b, s) / Var(s) s = n v s / (n^2 v + n R v + S^2)
    v, reg, sigma, max_items, clip = 0.3, 4.0, 0.7, 3, 1.0
    dp = UserLevelDP(
        noise_multiplier=sigma, max_items=max_items, residual_clip=clip,
        bias_prior_var=v, bias_reg=reg,
    )  # fmt: skip
    noise_var = sigma**2 * max_items * (clip**2 + 1)  # (sigma x the bias channel's sensitivity)^2
    counts = np.array([40.0, 6.0, 1.5])
    sums = np.array([12.0, -9.0, -3.0])  # they add up to 0: the mean stays at the centre

    mean, bias = released_biases(counts, sums, 3.5, dp)

    posterior = counts * v * sums / (counts**2 * v + counts * reg * v + noise_var)
    assert mean == pytest.approx(3.5)
    np.testing.assert_allclose(bias, posterior, rtol=1e-12)
    # and by simulation: regress b on s for the rarest item
    rng = np.random.default_rng(11)
    n = counts[2]
    b = rng.normal(0.0, math.sqrt(v), 400_000)
    s = n * b + rng.normal(0.0, math.sqrt(n * reg * v + noise_var), b.size)
    slope = np.cov(b, s)[0, 1] / np.var(s, ddof=1)
    assert bias[2] == pytest.approx(slope * sums[2], rel=0.02)


def test_a_noisy_total_count_of_at_most_one_leaves_the_mean_at_the_centre():
    dp = UserLevelDP(noise_multiplier=0.0, bias_reg=5.0)
    counts = np.array([0.6, 0.3])  # noise can leave a tiny (or negative) total
    sums = np.array([2.0, 1.0])

    mean, bias = released_biases(counts, sums, 3.0, dp)

    assert mean == 3.0  # no shift estimated from a total count below one
    np.testing.assert_allclose(bias, sums / (counts + 5.0))


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_one_release_costs_the_analytic_gaussian_mechanisms_epsilon(sigma):
    exact = _exact_gaussian_epsilon(sigma, DELTA)

    spent = epsilon(sigma, 1.0, 1, DELTA)

    # an accountant's bound is never below the exact epsilon, and a good one is close to it
    assert exact <= spent <= 1.15 * exact


def test_full_releases_cost_like_unsampled_rounds_and_nothing_costs_nothing():
    sigma = 1.5
    # two full Gaussian releases at sigma are one at sigma / sqrt(2)
    exact = _exact_gaussian_epsilon(sigma / math.sqrt(2), DELTA)

    assert exact <= epsilon(sigma, 1.0, 0, DELTA, full=2) <= 1.15 * exact
    assert epsilon(sigma, 0.3, 0, DELTA) == 0.0


def test_a_fixed_release_alone_costs_its_gaussians_epsilon():
    exact = _exact_gaussian_epsilon(3.0, DELTA)

    assert exact <= epsilon(1.0, 1.0, 0, DELTA, extra=(3.0,)) <= 1.15 * exact


def test_calibration_reaches_a_target_epsilon_below_one():
    sigma = calibrate(0.5, sampling_rate=1.0, rounds=1, delta=DELTA)

    assert epsilon(sigma, 1.0, 1, DELTA) <= 0.5
    # the noise is not far above what the exact mechanism needs for epsilon 0.5
    assert _exact_gaussian_epsilon(sigma, DELTA) <= 0.5
    assert _exact_gaussian_epsilon(0.85 * sigma, DELTA) > 0.5


@pytest.mark.parametrize("target", [0.5, 12.0])  # noise above and below 1
def test_calibration_returns_the_smallest_noise_to_its_documented_precision(target):
    sigma = calibrate(target, sampling_rate=1.0, rounds=1, delta=DELTA)

    assert epsilon(sigma, 1.0, 1, DELTA) <= target
    # within 1e-4 relative of the smallest noise that meets the target: a little less misses it
    assert epsilon(sigma * (1 - 1.5e-4), 1.0, 1, DELTA) > target


def test_limit_items_keeps_a_random_max_items_of_each_users_rows():
    rng = np.random.default_rng(8)
    n_rows, max_items = 200, 4
    users = rng.integers(0, 30, n_rows)
    rows = RatingRows(users, np.arange(n_rows), rng.normal(size=n_rows), n_users=30, n_items=n_rows)

    first = limit_items(rows, max_items, np.random.default_rng(1))
    second = limit_items(rows, max_items, np.random.default_rng(2))

    counts = np.bincount(users, minlength=30)
    np.testing.assert_array_equal(
        np.bincount(first.users, minlength=30), np.minimum(counts, max_items)
    )
    # every kept row is one of the user's own rows, rating and all (items are row numbers here)
    np.testing.assert_array_equal(first.users, users[first.items])
    np.testing.assert_array_equal(first.ratings, rows.ratings[first.items])
    assert set(first.items.tolist()) != set(second.items.tolist())  # a sample, not the first rows


def test_the_noise_on_a_gram_is_centred_with_the_asked_deviation():
    k, std = 60, 0.5
    noisy = noisy_gram(np.eye(k), std, np.random.default_rng(4))

    upper = (noisy - np.eye(k))[np.triu_indices(k)]  # 1830 independent draws
    assert abs(upper.mean()) < 5 * std / math.sqrt(upper.size)
    assert upper.std() == pytest.approx(std, rel=0.1)


def test_the_implicit_statistics_are_the_clipped_sums_written_out():
    rng = np.random.default_rng(3)
    n_users, n_items, k, alpha, clip = 4, 6, 3, 2.5, 0.7
    factors = rng.normal(0.0, 1.0, (n_users, k))
    factors[1] *= 0.01  # inside the clip: kept as it is
    users = np.array([0, 0, 1, 2, 2, 2, 3, 1])
    items = np.array([0, 2, 2, 1, 2, 5, 0, 5])
    rows = RatingRows(users, items, np.ones(users.size), n_users=n_users, n_items=n_items)
    dp = UserLevelDP(noise_multiplier=1.0, max_items=10, factor_clip=clip)

    stats, user_gram = clipped_implicit_statistics(rows, factors, alpha, dp)

    x = [f * min(1.0, clip / np.linalg.norm(f)) for f in factors]
    assert np.linalg.norm(x[0]) == pytest.approx(clip) and np.allclose(x[1], factors[1])
    np.testing.assert_allclose(user_gram, sum(np.outer(v, v) for v in x))
    assert stats.items.tolist() == sorted(set(items.tolist()))
    grams = unpack_symmetric(stats.grams, k)
    for j, item in enumerate(stats.items):
        mine = [u for u, i in zip(users, items, strict=True) if i == item]
        np.testing.assert_allclose(grams[j], sum(alpha * np.outer(x[u], x[u]) for u in mine))
        np.testing.assert_allclose(stats.rhs[j], sum((1 + alpha) * x[u] for u in mine))
        assert stats.counts[j] == len(mine)


def test_a_non_finite_value_is_bounded_like_any_other_not_passed_through():
    """No clip bounds a NaN and no noise hides one: a user whose fold-in went non-finite must
    contribute within the same bounds as everyone else, and a released sum never be NaN (it was
    floored to an exact, unnoised 0)."""
    from models.privacy.dp import clip_rows, clip_values
    from models.privacy.released_metrics import MetricRelease, bounded_error_sums

    rows = clip_rows(np.array([[np.nan, 1.0], [np.inf, -np.inf], [3.0, 4.0]]), 1.0)
    np.testing.assert_allclose(rows, [[0.0, 1.0], [0.0, 0.0], [0.6, 0.8]], rtol=1e-15)
    np.testing.assert_array_equal(
        clip_values(np.array([np.nan, np.inf, -np.inf, 0.5, 9.0]), 2.0), [0, 2, -2, 0.5, 2]
    )
    sums = bounded_error_sums(np.array([np.nan, 3.0]), np.array([4.0, 4.0]), 2.5)
    assert sums == {"sse": 1.0, "sae": 1.0, "n": 2.0}  # the NaN row counts 0 error
    release = MetricRelease(noise_multiplier=1.0)
    released = release.publish(
        {"valid": ({"sse": np.nan, "n": 3.0}, None)}, np.random.default_rng(1)
    )
    z = np.random.default_rng(1).normal(0.0, 1.0, 2)  # the same draws: n first, then sse
    deviation = release.deviations([("valid", "n"), ("valid", "sse")])[("valid", "sse")]
    assert released["valid"][0]["sse"] == pytest.approx(max(0.0, 0.0 + z[1] * deviation))
    assert released["valid"][0]["sse"] > 0  # noise on a 0, not an exact 0


@pytest.mark.parametrize("name", ["max_items", "shares"])
def test_a_bound_counted_by_the_accountant_is_a_whole_number_of_at_least_one(name):
    """A site builds its bounds from the coordinator's request: a fractional, zero or boolean
    count would have the accountant count a mechanism other than the one applied."""
    assert getattr(UserLevelDP(noise_multiplier=1.0, **{name: 1}), name) == 1
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"^{name}={bad!r} must be a whole number >= 1"):
            UserLevelDP(noise_multiplier=1.0, **{name: bad})
