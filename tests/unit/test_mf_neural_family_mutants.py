"""The explicit-MF and neural families' server steps, checkpoints and warm start, each against an
oracle written out here: the global mean of the summed ratings, the trivial baseline's shrunk item
means from the summed residuals, a checkpoint against the state it was written from, the items a
client's network update names, and a round nobody trained in."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.federation.loop import run_family
from models.federation.sampling import round_rng
from models.mf.family import BASELINE_SHRINK, ExplicitMF
from models.mf.federated import MFConfig
from models.neural.family import Neural, NeuralConfig
from models.neural.federated import FederatedConfig
from models.protocol import ClientUpdate

EMPTY = np.zeros(0, np.int64)


@pytest.fixture(scope="module")
def rated():
    data = generate_synthetic(n_users=120, n_items=40, n_interactions=2400, seed=11)
    owner = assign_clients(data, n_clients=3, strategy="iid", rng=np.random.default_rng(0))
    owner[0] = 3  # a client of one user
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    return data, build_clients(data, owner, split)


def _neural(latent: int = 4) -> Neural:
    return Neural(NeuralConfig(kind="dae", hidden=(), latent=latent,
                               federated=FederatedConfig(rounds=2)))  # fmt: skip


def test_the_global_mean_is_the_summed_ratings_over_the_summed_rows():
    family = ExplicitMF(MFConfig(n_factors=2))
    state = family.initial_state(5, 0)

    def mean(*sums):
        updates = [ClientUpdate(i, EMPTY, EMPTY, {}, s) for i, s in enumerate(sums)]
        return family.server_update(state, updates, "mean").params.global_mean

    assert mean({"rating_sum": 7.0, "n": 2.0}, {"rating_sum": 4.0, "n": 1.0}) == pytest.approx(
        11 / 3
    )
    assert mean({"rating_sum": 4.5, "n": 1.0}) == 4.5  # one rating is a mean too
    assert mean() == 0.0  # no client had a rating


def test_the_trivial_baseline_is_each_items_shrunk_mean_residual_from_the_first_round(rated):
    data, clients = rated
    k = 2
    family = ExplicitMF(MFConfig(n_factors=k))
    state = family.initial_state(data.n_items, 0)
    state = family.server_update(
        state, [family.client_round(c, state, "mean", np.random.default_rng(0), ())[0]
                for c in clients], "mean",
    )  # fmt: skip
    updates = [
        family.client_round(c, state, "train", round_rng(0, 1, c.client_id, private=False), ())[0]
        for c in clients
    ]
    trained = family.server_update(state, updates, "train")

    counts, residuals = np.zeros(data.n_items), np.zeros(data.n_items)
    for u in updates:
        np.add.at(counts, u.items, u.counts)
        np.add.at(residuals, u.items, u.arrays["rhs"][:, k])
    np.testing.assert_allclose(trained.baseline, residuals / (counts + BASELINE_SHRINK))
    again = family.server_update(trained, updates, "train")  # kept from the first round
    np.testing.assert_array_equal(again.baseline, trained.baseline)


def test_a_checkpoint_restores_each_familys_popularity_and_trained_items(rated):
    data, clients = rated
    for family in (ExplicitMF(MFConfig(n_factors=2)), _neural()):
        state, _ = run_family(family, clients, data.n_items, rounds=1, eval_splits=())
        assert state.popularity is not None and state.trained is not None, family.name
        back = family.load_state(family.state_arrays(state))
        np.testing.assert_array_equal(back.popularity, state.popularity)
        np.testing.assert_array_equal(back.trained, state.trained)
        np.testing.assert_array_equal(family.servable(state).popularity, state.popularity)


def test_a_network_update_names_every_item_the_client_trained_on(rated):
    data, clients = rated
    family = _neural()
    state = family.initial_state(data.n_items, 0)
    for client in clients:
        update = family.client_round(client, state, "train", np.random.default_rng(1), ())[0]
        items, counts = np.unique(client.rows("train").items, return_counts=True)
        assert update.items.tolist() == items.tolist()
        assert update.counts.tolist() == counts.tolist()


def test_a_round_nobody_trained_in_keeps_the_network_and_one_user_moves_it(rated):
    data, clients = rated
    family = _neural()
    state = family.initial_state(data.n_items, 0)
    nobody = ClientUpdate(0, EMPTY, EMPTY, {}, {"users": 0.0})
    kept = family.server_update(state, [nobody], "train")
    assert kept.round == state.round + 1
    for name, value in state.params.items():
        np.testing.assert_array_equal(kept.params[name], value)
    one = next(c for c in clients if len(c.user_ids) == 1)
    update = family.client_round(one, state, "train", np.random.default_rng(2), ())[0]
    assert update.metrics["users"] == 1.0
    moved = family.server_update(state, [update], "train")
    assert any(not np.array_equal(moved.params[n], v) for n, v in state.params.items())


def test_a_network_warm_starts_only_from_a_champion_of_the_same_shape_and_catalogue(rated):
    data, clients = rated
    family = _neural(latent=4)
    state, _ = run_family(family, clients, data.n_items, rounds=1, eval_splits=())
    champion = family.servable(state)
    fresh = family.initial_state(data.n_items, 3)
    warm, n = family.warm_start(fresh, champion)
    assert n == data.n_items
    for name, value in champion.params.items():
        np.testing.assert_array_equal(warm.params[name], value)
    other = _neural(latent=5)
    assert other.warm_start(other.initial_state(data.n_items, 3), champion) is None
    renamed = replace(family, item_ids=np.array([f"x{i}" for i in range(data.n_items)]))
    assert renamed.warm_start(fresh, champion) is None


def test_an_mf_warm_start_marks_the_items_the_champion_trained(rated):
    data, clients = rated
    family = ExplicitMF(MFConfig(n_factors=2))
    state, _ = run_family(family, clients, data.n_items, rounds=1, eval_splits=())
    champion = family.servable(state)
    warm, _ = family.warm_start(family.initial_state(data.n_items, 3), champion)
    known = {str(i) for i in champion.known_items}
    assert known and warm.trained.tolist() == [str(i) in known for i in range(data.n_items)]
