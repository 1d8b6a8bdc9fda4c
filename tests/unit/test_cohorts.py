"""Cross-device simulation: per-user clients sampled by their own coins, and cohorts whose summed
update does not depend on how users are grouped (cohort size 1 against 500)."""

import numpy as np
import pytest

from models.cohorts import family_cohort_round, sample_devices, sampled_cohort
from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig, client_rating_sums, init_global_state, server_update
from models.ranking.family import TwoStage
from models.ranking.federated import RankingConfig, implicit_server_update, init_item_factors


def test_each_device_flips_its_own_seeded_coin():
    ids = np.array([f"user-{i}" for i in range(20_000)])
    chosen = sample_devices(ids, 0.3, seed=7, round_=2)
    assert abs(chosen.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / ids.size)
    # the same coin whatever else is in the cohort, new coins in another round or seed
    np.testing.assert_array_equal(sample_devices(ids[::-1], 0.3, 7, 2), chosen[::-1])
    np.testing.assert_array_equal(sample_devices(ids[:5], 0.3, 7, 2), chosen[:5])
    assert (sample_devices(ids, 0.3, 7, 3) != chosen).mean() > 0.3
    assert (sample_devices(ids, 0.3, 8, 2) != chosen).mean() > 0.3
    assert sample_devices(ids, 1.0, 7, 2).all()


@pytest.fixture(scope="module")
def population():
    """600 users, each its own client, grouped in cohorts of 1, of 500 (500 + 100), and in two
    random halves."""
    data = generate_synthetic(n_users=600, n_items=80, n_interactions=15_000, seed=5)
    rng = np.random.default_rng(0)
    users = np.arange(data.n_users)
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    halves = assign_clients(data, n_clients=2, strategy="iid", rng=rng)
    groupings = {"1": users, "500": users // 500, "halves": halves}
    return data, {name: build_clients(data, owner, split) for name, owner in groupings.items()}


@pytest.mark.parametrize("fraction", [1.0, 0.4])
def test_explicit_cohorts_of_any_size_give_the_same_aggregate(population, fraction):
    data, groupings = population
    config = MFConfig(n_factors=4, reg=0.1, clip_to=data.rating_scale)
    family = ExplicitMF(config)
    results = {}
    for name, cohorts in groupings.items():
        state = init_global_state(
            data.n_items, config, [client_rating_sums(c) for c in cohorts], seed=0
        )
        for r in (1, 2):
            answers = [
                family_cohort_round(family, c, state, "train", 0, r, fraction, ()) for c in cohorts
            ]
            state = server_update(state, [u for u, _ in answers], config)
        clients = sum(u.metrics["clients"] for u, _ in answers)
        results[name] = (state.params, clients)
    reference, n = results["1"]
    assert n == pytest.approx(fraction * 600, rel=0.2) and (fraction == 1.0) == (n == 600)
    for params, clients in results.values():
        assert clients == n
        np.testing.assert_allclose(params.factors, reference.factors, atol=1e-9)
        np.testing.assert_allclose(params.bias, reference.bias, atol=1e-9)


def test_implicit_cohorts_of_any_size_give_the_same_aggregate(population):
    data, groupings = population
    config = RankingConfig(n_factors=4, reg=5.0, ranker=None)
    family = TwoStage(config)
    results = {}
    for name, cohorts in groupings.items():
        state = family.initial_state(data.n_items, 0)
        assert np.array_equal(state.factors, init_item_factors(data.n_items, config, 0))
        for r in (1, 2):
            updates = [
                family_cohort_round(family, c, state, "als", 0, r, 0.5, ())[0] for c in cohorts
            ]
            state = family.server_update(state, updates, "als")
        results[name] = state.factors
    for factors in results.values():
        np.testing.assert_allclose(factors, results["1"], atol=1e-9)


def test_a_sampled_cohort_keeps_held_out_rows_and_only_its_sampled_users_training_rows(
    population,
):
    _, groupings = population
    cohort = groupings["500"][0]
    sampled, n = sampled_cohort(cohort, 0.25, seed=3, round_=1)
    chosen = sample_devices(cohort.user_ids, 0.25, 3, 1)
    train = sampled.rows("train")
    assert set(np.unique(train.users)) == set(np.flatnonzero(chosen)) and n == chosen.sum()
    for split in ("valid", "test"):
        assert len(sampled.rows(split)) == len(cohort.rows(split))


def test_a_running_sum_equals_adding_every_update_at_once(population):
    from models.aggregation import aggregate_item_sums
    from models.cohorts import RunningSum
    from models.ranking.federated import implicit_client_round

    data, groupings = population
    cohorts = groupings["1"][:200]  # 200 single-user updates, touching different items
    config = RankingConfig(n_factors=3, reg=5.0, ranker=None)
    factors = init_item_factors(data.n_items, config, 0)
    updates = [implicit_client_round(c, factors, config)[0] for c in cohorts]
    running = RunningSum(data.n_items)
    kept = [running.add(u) for u in updates]
    total = running.total()

    counts = aggregate_item_sums([(u.items, u.counts) for u in updates], data.n_items)
    np.testing.assert_array_equal(total.items, np.flatnonzero(counts))
    assert total.counts.dtype == np.int64
    np.testing.assert_array_equal(total.counts, counts[total.items])
    for name in ("gram", "rhs"):
        summed = aggregate_item_sums([(u.items, u.arrays[name]) for u in updates], data.n_items)
        np.testing.assert_allclose(total.arrays[name], summed[total.items], rtol=1e-12)
    np.testing.assert_allclose(
        total.arrays["user_gram"], np.sum([u.arrays["user_gram"] for u in updates], axis=0)
    )
    assert total.metrics["train_n"] == sum(u.metrics["train_n"] for u in updates)
    assert [k.nbytes() for k in kept] == [u.nbytes() for u in updates]
    assert implicit_server_update(factors, [total], config) == pytest.approx(
        implicit_server_update(factors, updates, config), abs=1e-10
    )


def test_a_sampled_cohorts_update_is_its_sampled_users_training_and_everyone_evaluates(population):
    """Oracle: the same cohort with only the chosen users' training rows, filtered here with
    pandas from the users' own coins, answering a round in which everyone trains."""
    from dataclasses import replace

    from models.cohorts import cohort_round

    data, groupings = population
    cohort = groupings["500"][0]
    config = MFConfig(n_factors=4, reg=0.1, clip_to=data.rating_scale)
    family = ExplicitMF(config)
    state = init_global_state(data.n_items, config, [client_rating_sums(cohort)], seed=0)
    calls = []

    def train(client, splits):
        calls.append(("train", client.n_users, len(client.frame), tuple(splits)))
        return family.client_round(client, state, "train", np.random.default_rng(0), splits)

    def evaluate(client, splits):
        calls.append(("evaluate", client.n_users, len(client.frame), tuple(splits)))
        return family.evaluate(client, state, splits)

    update, evaluations = cohort_round(cohort, 0.3, 9, 4, train, evaluate, ("valid",))

    chosen = np.flatnonzero(sample_devices(cohort.user_ids, 0.3, 9, 4))
    frame = cohort.frame
    kept = frame[(frame["split"] != 0) | frame["user"].isin(chosen)]
    by_hand = replace(cohort, frame=kept.reset_index(drop=True))
    expected, _ = family.client_round(by_hand, state, "train", np.random.default_rng(0), ())
    np.testing.assert_array_equal(update.items, expected.items)
    np.testing.assert_array_equal(update.counts, expected.counts)
    for name, array in expected.arrays.items():
        np.testing.assert_allclose(update.arrays[name], array, rtol=1e-12)
    everyone, _ = family.client_round(cohort, state, "train", np.random.default_rng(0), ())
    assert everyone.counts.sum() > update.counts.sum()  # the coins left rows out
    trained = frame[(frame["split"] == 0) & frame["user"].isin(chosen)]["user"].nunique()
    assert update.metrics["clients"] == trained
    # every user evaluated the incoming model, on the whole cohort's rows; training saw no split
    assert calls == [
        ("evaluate", cohort.n_users, len(frame), ("valid",)),
        ("train", cohort.n_users, len(by_hand.frame), ()),
    ]
    alone = family.evaluate(cohort, state, ("valid",))
    assert evaluations.keys() == alone.keys()
    for split, (metrics, per_user) in alone.items():
        assert evaluations[split][0] == metrics
        np.testing.assert_array_equal(evaluations[split][1], per_user)


def test_coins_depend_on_the_whole_seed_and_round_and_take_any_seed():
    ids = np.array([f"u{i}" for i in range(4_000)])
    base = sample_devices(ids, 0.5, seed=1, round_=1)
    for seed, round_ in ((81, 1), (1, 81), (10**7 + 1, 1)):  # equal to (1, 1) modulo small powers
        assert (sample_devices(ids, 0.5, seed, round_) != base).mean() > 0.3, (seed, round_)
    for seed in (2**31 - 1, 2**63 - 1):  # seeds and rounds longer than the key's 8 digits each
        big = sample_devices(ids, 0.5, seed=seed, round_=123_456_789)
        assert abs(big.mean() - 0.5) < 4 * np.sqrt(0.25 / ids.size)
