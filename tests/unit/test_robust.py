"""Robust aggregation rules against numpy/scipy oracles, and the simulated attacks."""

import numpy as np
import pytest
from scipy import stats

from models.robust import (
    aggregate_robust,
    attack_update,
    choose_attackers,
    clip_norms,
    coordinate_median,
    trimmed_mean,
)


def _contributions(rng, n_clients=7, n_items=6, d=3):
    out = []
    for _ in range(n_clients):
        items = np.sort(rng.choice(n_items, size=rng.integers(2, n_items + 1), replace=False))
        out.append(
            (items, rng.normal(size=(items.size, d)), rng.integers(1, 5, items.size).astype(float))
        )
    return out


def _per_item(contributions, item):
    return np.array([v[list(i).index(item)] for i, v, _ in contributions if item in i])


def test_median_and_trimmed_mean_equal_numpy_and_scipy_item_by_item():
    rng = np.random.default_rng(0)
    parts = _contributions(rng)
    median = coordinate_median(parts, 8)
    trimmed = trimmed_mean(parts, 8, 0.2)

    cut = 2  # ceil(0.2 * 7 clients): the same number dropped at each end of every item
    for item in range(6):
        values = _per_item(parts, item)
        np.testing.assert_allclose(median[item], np.median(values, axis=0))
        m = len(values)
        expected = stats.trim_mean(values, cut / m, axis=0) if m > 2 * cut else 0.0
        np.testing.assert_allclose(trimmed[item], expected)
    assert np.all(median[6:] == 0) and np.all(trimmed[6:] == 0)  # nobody touched items 6, 7


def test_attackers_who_send_values_for_a_rare_item_cannot_set_it():
    """Two attackers of ten clients send 20 x the honest value for item 0, which two honest
    clients touched, and for item 1, which three did. Trimming per item (ceil(0.2 * 4) = 1 value
    at each end) or taking the median of [1, 1, 20, 20] lets them move item 0 tenfold; the rules
    drop ceil(0.2 * 10) = 2 values at each end, so item 0 (4 clients) is left alone and item 1
    (5 clients) takes an honest value."""
    common = (np.arange(2, 6), np.ones((4, 2)), np.ones(4))
    honest = [
        (np.arange(0, 6), np.ones((6, 2)), np.ones(6)),
        (np.arange(0, 6), np.ones((6, 2)), np.ones(6)),
        (np.arange(1, 6), np.ones((5, 2)), np.ones(5)),
        *[common] * 5,
    ]
    attackers = [(np.arange(0, 6), np.full((6, 2), 20.0), np.ones(6))] * 2
    parts = honest + attackers

    for rule in ("median", "trimmed_mean"):
        update, weight = aggregate_robust(parts, 6, rule, trim=0.2)
        assert weight[0] == 0.0, rule  # left alone
        np.testing.assert_allclose(update[1:], 1.0, err_msg=rule)
        assert np.all(weight[1:] > 0), rule
    # the rule scaled to each item's clients: one value cut at each end of item 0's four
    per_item = np.sort(_per_item(parts, 0), axis=0)[1:-1].mean(axis=0)
    assert np.all(per_item > 10)


def test_robust_rules_ignore_a_minority_of_huge_updates_and_mean_does_not():
    honest = [(np.arange(4), np.full((4, 2), 1.0), np.ones(4)) for _ in range(8)]
    attackers = [(np.arange(4), np.full((4, 2), -1e6), np.ones(4)) for _ in range(2)]
    parts = honest + attackers

    mean, _ = aggregate_robust(parts, 4, "mean")
    assert np.all(mean < -1e4)
    for rule in ("median", "trimmed_mean"):
        robust, weight = aggregate_robust(parts, 4, rule, trim=0.2)
        np.testing.assert_allclose(robust, 1.0)
        np.testing.assert_allclose(weight, 10.0)
    # an item only two clients touched is left alone by a robust rule, not by the mean
    few = [
        (np.array([0]), np.array([[1.0, 1.0]]), np.ones(1)),
        (np.array([0]), np.array([[-9.0, -9.0]]), np.ones(1)),
    ]
    assert aggregate_robust(few, 1, "median", min_clients=3)[1][0] == 0.0
    assert aggregate_robust(few, 1, "mean")[1][0] == 2.0
    clipped, _ = aggregate_robust(parts, 4, "norm_clip", clip_factor=2.0)
    assert np.all(np.abs(clipped) <= 2.0)  # the attackers' pull is bounded by the clip


def test_norm_clipping_bounds_each_update_to_the_factor_times_the_median_norm():
    parts = [(np.array([0]), np.array([[n, 0.0]]), np.ones(1)) for n in (1.0, 2.0, 3.0, 100.0)]
    clipped, bound = clip_norms(parts, 1.5)
    assert bound == pytest.approx(1.5 * 2.5)
    norms = [np.linalg.norm(v) for _, v, _ in clipped]
    np.testing.assert_allclose(norms, [1.0, 2.0, 3.0, 3.75])


def test_attacks_and_the_choice_of_attackers():
    values = np.arange(6.0).reshape(3, 2)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(attack_update(values, "sign_flip", 2.0, rng), -2 * values)
    np.testing.assert_allclose(attack_update(values, "scale", 10.0, rng), 10 * values)
    noise = attack_update(values, "random", 3.0, rng)
    assert noise.shape == values.shape and not np.allclose(noise, values)
    # random: zero-mean Gaussian noise at 3 x the honest update's spread (2000 draws: the
    # sample's standard deviation is within 5% of it, its mean within 0.5 of 0, by 3 sigma)
    honest = np.random.default_rng(5).normal(4.0, 2.0, size=(500, 4))
    noise = attack_update(honest, "random", 3.0, rng)
    assert noise.std() == pytest.approx(3.0 * honest.std(), rel=0.05)
    assert abs(noise.mean()) < 0.5
    # an update without spread (every value the same) gets noise of standard deviation 3 x 1
    flat = attack_update(np.full((500, 4), 7.0), "random", 3.0, rng)
    assert flat.std() == pytest.approx(3.0, rel=0.05) and abs(flat.mean()) < 0.5
    chosen = choose_attackers(10, 0.2, seed=1)
    assert len(chosen) == 2 and set(chosen) <= set(range(10))
    assert chosen == choose_attackers(10, 0.2, seed=1) != choose_attackers(10, 0.2, seed=2)
    assert choose_attackers(10, 0.0, seed=1) == ()


def test_screened_mean_keeps_fedavg_within_2_percent_of_clean_under_every_attack_at_20_percent():
    import warnings
    from dataclasses import replace

    from models.data.partitions import build_clients
    from models.data.sharding import assign_clients, split_rows
    from models.data.synthetic import generate_synthetic
    from models.mf.federated import MFConfig, run_federated

    data = generate_synthetic(n_users=600, n_items=100, n_interactions=24_000, seed=2)
    rng = np.random.default_rng(0)
    owner = assign_clients(data, n_clients=10, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.0, test_fraction=0.2)
    clients = build_clients(data, owner, split)
    base = MFConfig(algorithm="fedavg", n_factors=8, clip_to=data.rating_scale)
    attackers = choose_attackers(10, 0.2, 0)

    def rmse(config):
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", RuntimeWarning
            )  # plain averaging may overflow: that is the point
            _, history = run_federated(
                clients, data.n_items, config, rounds=10, eval_splits=("test",), eval_ranking=False
            )
        return history[-1].metrics.get("test/rmse", np.nan)

    clean = rmse(base)
    for attack, strength in (("sign_flip", 5.0), ("scale", 20.0), ("random", 20.0)):
        attacked = replace(base, attack=attack, attack_scale=strength, attack_clients=attackers)
        assert not rmse(attacked) < 1.1 * clean, attack  # plain averaging is wrecked (or NaN)
        screened = rmse(replace(attacked, aggregation="screened_mean", trim=0.2))
        assert screened < 1.02 * clean, attack
    # the coordinate-wise trimmed mean drops honest values too and leans towards the sign flips
    flipped = replace(base, attack="sign_flip", attack_scale=5.0, attack_clients=attackers)
    assert rmse(replace(flipped, aggregation="trimmed_mean", trim=0.2)) > 1.02 * clean


def test_screened_mean_leaves_out_the_clients_farthest_from_the_median_and_averages_the_rest():
    rng = np.random.default_rng(3)
    honest = [
        (np.arange(5), rng.normal(1.0, 0.1, size=(5, 2)), rng.integers(1, 5, 5).astype(float))
        for _ in range(8)
    ]
    attackers = [(np.arange(5), -5.0 * h[1], h[2]) for h in honest[:2]]  # sign flips x5
    parts = honest + attackers

    screened, weight = aggregate_robust(parts, 5, "screened_mean", trim=0.2)

    values = np.stack([v for _, v, _ in honest])  # (8, 5, 2)
    weights = np.stack([w for _, _, w in honest])  # (8, 5)
    for item in range(5):
        expected = np.average(values[:, item], axis=0, weights=weights[:, item])
        np.testing.assert_allclose(screened[item], expected)
        assert weight[item] == pytest.approx(weights[:, item].sum())
    # the coordinate-wise rules drop 2 values at each end of every coordinate: both attackers
    # below, and the 2 largest honest values above, so what is left leans towards the attackers
    honest_mean = np.average(
        values, axis=0, weights=np.broadcast_to(weights[..., None], values.shape)
    )
    trimmed, _ = aggregate_robust(parts, 5, "trimmed_mean", trim=0.2)
    assert np.all(trimmed < honest_mean)


def test_a_client_the_screen_cannot_measure_is_left_out_and_a_tiny_round_moves_nothing():
    common = [(np.arange(3), np.ones((3, 1)), np.ones(3)) for _ in range(5)]
    rare = (np.array([3]), np.array([[50.0]]), np.ones(1))  # touched no item the median covers
    update, weight = aggregate_robust([*common, rare], 4, "screened_mean", trim=0.1)

    np.testing.assert_allclose(update[:3], 1.0)
    assert weight[3] == 0.0 and np.all(weight[:3] == 5.0)
    one = [(np.arange(3), np.ones((3, 1)), np.ones(3))]
    assert np.all(aggregate_robust(one, 3, "screened_mean", trim=0.2, min_clients=1)[1] == 0)
