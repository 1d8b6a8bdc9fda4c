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

    for item in range(6):
        values = _per_item(parts, item)
        np.testing.assert_allclose(median[item], np.median(values, axis=0))
        m = len(values)
        cut = min(int(np.ceil(0.2 * m)), (m - 1) // 2)  # rounded up, at least one value kept
        np.testing.assert_allclose(trimmed[item], stats.trim_mean(values, cut / m, axis=0))
    assert np.all(median[6:] == 0) and np.all(trimmed[6:] == 0)  # nobody touched items 6, 7


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
    chosen = choose_attackers(10, 0.2, seed=1)
    assert len(chosen) == 2 and set(chosen) <= set(range(10))
    assert chosen == choose_attackers(10, 0.2, seed=1) != choose_attackers(10, 0.2, seed=2)
    assert choose_attackers(10, 0.0, seed=1) == ()


def test_trimmed_mean_keeps_fedavg_close_to_clean_with_20_percent_sign_flippers():
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
    attacked = {
        "attack": "sign_flip",
        "attack_scale": 5.0,
        "attack_clients": choose_attackers(10, 0.2, 0),
    }

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
    poisoned_mean = rmse(replace(base, **attacked))
    robust = rmse(replace(base, aggregation="trimmed_mean", trim=0.2, **attacked))

    assert not poisoned_mean < 1.1 * clean  # plain averaging is wrecked (or NaN)
    # within 8% on this small synthetic set (the ML-100K benchmark in the README: within 2%)
    assert robust < 1.08 * clean
