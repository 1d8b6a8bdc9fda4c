"""One contract suite over every model family run by the single reference loop: each family
through the loop equals its centralized oracle, its state survives a checkpoint, and a champion
built from its servable model evaluates like the state it came from."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from scipy import sparse

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.federation.evaluation import summarize_splits
from models.federation.family import Family, Recommender
from models.federation.loop import run_family
from models.federation.sampling import client_rng
from models.mf.als import CentralizedALS, RatingRows
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.mf.implicit import CentralizedImplicitALS
from models.neural.family import Neural, NeuralConfig
from models.neural.training import TrainConfig, train_epochs
from models.ranking.boosting import RankerConfig
from models.ranking.family import TwoStage
from models.ranking.federated import RankingConfig
from models.ranking.knn import cooccurrence, cosine_neighbours


def _partition(n_clients: int):
    data = generate_synthetic(n_users=240, n_items=90, n_interactions=7000, seed=11)
    rng = np.random.default_rng(3)
    owner = assign_clients(data, n_clients=n_clients, strategy="dirichlet", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.15, test_fraction=0.15)
    return data, owner, split


@pytest.fixture(scope="module")
def federation():
    data, owner, split = _partition(4)
    return data, build_clients(data, owner, split)


def _pooled(data, clients, binary: bool) -> RatingRows:
    """Everyone's training rows in one place, users indexed globally: the centralized view."""
    users, items, ratings = [], [], []
    for c in clients:
        rows = c.rows("train")
        users.append(np.searchsorted(data.user_ids, c.user_ids[rows.users]))
        items.append(rows.items)
        ratings.append(np.ones(len(rows)) if binary else rows.ratings)
    return RatingRows(
        np.concatenate(users),
        np.concatenate(items),
        np.concatenate(ratings),
        n_users=data.n_users,
        n_items=data.n_items,
    )


SMALL_NETWORK = NeuralConfig(
    kind="dae", hidden=(), latent=8, train=TrainConfig(batch_size=64, learning_rate=1e-2)
)

FAMILIES = {
    "explicit-als": lambda: ExplicitMF(MFConfig(n_factors=4, reg=0.05, init_std=0.1)),
    "explicit-fedadam": lambda: ExplicitMF(MFConfig(algorithm="fedadam", n_factors=4)),
    "two-stage": lambda: TwoStage(
        RankingConfig(
            n_factors=4,
            reg=0.5,
            alpha=2.0,
            init_std=0.1,
            neighbours=20,
            n_candidates=30,
            ranker=RankerConfig(rounds=2, num_leaves=7),
        )
    ),
    "neural": lambda: Neural(SMALL_NETWORK),
}


def test_explicit_als_through_the_loop_equals_centralized_als(federation):
    data, clients = federation
    family = FAMILIES["explicit-als"]()
    state, history = run_family(family, clients, data.n_items, rounds=5, seed=7, eval_splits=())

    central = CentralizedALS(n_factors=4, reg=0.05, n_iter=5, init_std=0.1, seed=7)
    central.fit(_pooled(data, clients, binary=False))
    np.testing.assert_allclose(state.params.factors, central.item_params_.factors, atol=1e-8)
    np.testing.assert_allclose(state.params.bias, central.item_params_.bias, atol=1e-8)
    assert state.params.global_mean == pytest.approx(central.item_params_.global_mean, abs=1e-12)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]


def test_two_stage_retrieval_through_the_loop_equals_centralized_implicit_als_and_knn(federation):
    data, clients = federation
    family = FAMILIES["two-stage"]()
    state, history = run_family(family, clients, data.n_items, rounds=3, seed=5, eval_splits=())

    pooled = _pooled(data, clients, binary=True)
    central = CentralizedImplicitALS(4, reg=0.5, alpha=2.0, n_iter=3, init_std=0.1, seed=5)
    central.fit(pooled)
    np.testing.assert_allclose(state.factors, central.item_params_.factors, atol=1e-8)
    matrix = sparse.csr_matrix(
        (pooled.ratings, (pooled.users, pooled.items)), shape=(data.n_users, data.n_items)
    )
    expected = cosine_neighbours(cooccurrence(matrix), neighbours=20, shrink=10.0)
    np.testing.assert_allclose(state.similarity.toarray(), expected.toarray(), atol=1e-6)
    assert len(state.ensemble) > 0 and state.stage == "ranker"
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]  # 3 ALS rounds, then 2 ranker rounds


def test_the_neural_network_through_the_loop_on_one_client_equals_centralized_training():
    """FedAvg with one client holding every user, server step 1: one round of two local epochs
    is two centralized epochs of the same network from the same start with the same stream."""
    data, _, split = _partition(4)
    everyone = build_clients(data, np.zeros(data.n_users, np.int32), split)[0]
    family = Neural(
        replace(SMALL_NETWORK, federated=replace(SMALL_NETWORK.federated, local_epochs=2))
    )
    state, _ = run_family(family, [everyone], data.n_items, rounds=1, seed=9, eval_splits=())

    start = family.initial_state(data.n_items, 9)
    history = everyone.matrix("train")
    rng = client_rng(9, 1, 0)
    central, _, _ = train_epochs(
        start.params, start.arch, history, SMALL_NETWORK.train, epochs=2, rng=rng
    )
    for name, value in central.items():
        np.testing.assert_allclose(state.params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_keeps_the_contract(federation, name):
    data, clients = federation
    family: Family = FAMILIES[name]()
    assert isinstance(family, Family)
    state, _ = run_family(family, clients, data.n_items, rounds=2, seed=1, eval_splits=())

    # a checkpoint round trip (npz, no pickle) gives back the same state
    buffer = io.BytesIO()
    np.savez(buffer, **family.state_arrays(state))
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as stored:
        restored = family.load_state({k: stored[k] for k in stored.files})
    for key, value in family.state_arrays(state).items():
        np.testing.assert_array_equal(family.state_arrays(restored)[key], value)

    # the servable model, made a champion, evaluates as the state it was built from
    model = family.servable(state)
    assert isinstance(model, Recommender)
    target = family.for_champion(model)
    assert not isinstance(target, str)
    splits = ("valid", "test")
    ours = summarize_splits(
        [family.evaluate(c, state, splits) for c in clients], family.top_k, data.n_items
    )
    # the run's trivial baseline is measured beside its own model, not beside a champion
    ours = {k: v for k, v in ours.items() if not k.startswith("baseline/")}
    champion_family, champion_state = target
    theirs = summarize_splits(
        [champion_family.evaluate(c, champion_state, splits) for c in clients],
        family.top_k,
        data.n_items,
    )
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        assert theirs[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    # warm start from its own model carries every item it trained on
    started = family.warm_start(family.initial_state(data.n_items, 2), model)
    assert started is not None and started[1] > 0.5 * data.n_items


def test_a_champion_of_another_family_is_not_comparable(federation):
    data, clients = federation
    explicit, ranking = FAMILIES["explicit-als"](), FAMILIES["two-stage"]()
    state, _ = run_family(explicit, clients, data.n_items, rounds=1, eval_splits=())
    assert ranking.for_champion(explicit.servable(state)) == "it is not a ranking model"
    assert (
        ranking.warm_start(ranking.initial_state(data.n_items, 0), explicit.servable(state)) is None
    )
