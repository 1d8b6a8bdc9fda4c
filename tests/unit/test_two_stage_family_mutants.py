"""The two-stage family's server-side pieces and the reference loop's round figures, each against
an oracle written out here: the secure-aggregation encoding against the updates summed by hand,
the served model's popularity and trained items against the training rows, a checkpoint against
the state it was written from, and a round's training RMSE and seconds."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest

from models.client import TRAIN
from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.federation.loop import EVERYONE_ROUND, round_metrics, run_family
from models.federation.sampling import round_rng
from models.privacy.dp import UserLevelDP
from models.protocol import ClientUpdate
from models.ranking.boosting import RankerConfig
from models.ranking.family import ALS, TwoStage
from models.ranking.federated import RankingConfig


@pytest.fixture(scope="module")
def sparse_items():
    """Implicit data in which one item has no row at all and another a single training row."""
    data = generate_synthetic(n_users=200, n_items=60, n_interactions=4000, seed=9)
    frame = data.frame.assign(rating=1.0)
    counts = np.bincount(frame["item"].to_numpy(), minlength=data.n_items)
    unseen, once = (int(i) for i in np.argsort(counts, kind="stable")[:2])
    frame = frame[frame["item"] != unseen]
    single = np.flatnonzero(frame["item"].to_numpy() == once)
    frame = frame.drop(frame.index[single[1:]]).reset_index(drop=True)
    data = type(data)(frame, data.user_ids, data.item_ids)
    split = split_rows(data, method="random", valid_fraction=0.15, test_fraction=0.15)
    split[np.flatnonzero(frame["item"].to_numpy() == once)] = TRAIN
    owner = assign_clients(data, n_clients=3, strategy="iid", rng=np.random.default_rng(0))
    return data, build_clients(data, owner, split), unseen, once


def _train_counts(clients, n_items: int) -> np.ndarray:
    counts = np.zeros(n_items)
    for c in clients:
        np.add.at(counts, c.rows("train").items, 1.0)
    return counts


def _als_updates(family: TwoStage, clients, state, private: bool):
    return [
        family.client_round(c, state, ALS, round_rng(0, 1, c.client_id, private=private), ())[0]
        for c in clients
    ]


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_the_secure_encoding_sums_to_the_clients_updates_summed_by_hand(sparse_items, private):
    data, clients, _, _ = sparse_items
    n, k = data.n_items, 3
    dp = UserLevelDP(noise_multiplier=1.0) if private else None
    family = TwoStage(RankingConfig(n_factors=k, ranker=None, dp=dp))
    state = family.initial_state(n, 0)
    updates = _als_updates(family, clients, state, private)

    total = np.sum([family.to_dense(u, n) for u in updates], axis=0)
    combined = family.from_dense_sum(total, n)

    counts, grams, rhs = np.zeros(n), np.zeros((n, k * (k + 1) // 2)), np.zeros((n, k))
    for u in updates:
        np.add.at(counts, u.items, u.counts)
        np.add.at(grams, u.items, u.arrays["gram"])
        np.add.at(rhs, u.items, u.arrays["rhs"])
    items = np.arange(n) if private else np.flatnonzero(counts > 0)
    assert combined.items.tolist() == items.tolist()
    np.testing.assert_allclose(combined.counts, counts[items])
    np.testing.assert_allclose(combined.arrays["gram"], grams[items], atol=1e-9)
    np.testing.assert_allclose(combined.arrays["rhs"], rhs[items], atol=1e-9)
    np.testing.assert_allclose(
        combined.arrays["user_gram"], np.sum([u.arrays["user_gram"] for u in updates], axis=0)
    )
    train_n = sum(u.metrics.get("train_n", 0.0) for u in updates)
    assert combined.metrics == ({} if private else {"train_n": train_n})
    # and the server's step on the sum is its step on the updates
    np.testing.assert_allclose(
        family.server_update(state, [combined], ALS).factors,
        family.server_update(state, updates, ALS).factors,
        atol=1e-9,
    )


def test_only_implicit_als_updates_have_a_dense_encoding(sparse_items):
    data, clients, _, _ = sparse_items
    family = TwoStage(RankingConfig(n_factors=3, ranker=None))
    knn = family.client_round(clients[0], family.initial_state(data.n_items, 0), "knn",
                              np.random.default_rng(0), ())[0]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"only implicit-ALS updates .*missing \['gram', 'rhs', 'user_gram'\]"
    ):
        family.to_dense(knn, data.n_items)


def test_the_served_model_knows_exactly_the_items_training_saw(sparse_items):
    """After the co-occurrence round the served model's popularity is each item's training rows
    and its trained items are those with one or more (a single row is enough); before it, and
    under DP, whose counts are noisy, no item is marked."""
    data, clients, unseen, once = sparse_items
    family = TwoStage(RankingConfig(n_factors=3, ranker=None, ease_reg=20.0))
    state, _ = run_family(family, clients, data.n_items, rounds=1, eval_splits=())
    served = family.servable(state)
    counts = _train_counts(clients, data.n_items)
    np.testing.assert_allclose(served.retrieval.popularity, counts)
    assert served.trained.tolist() == (counts > 0).tolist()
    assert not served.trained[unseen] and served.trained[once]
    assert family.servable(replace(state, stage=ALS)).trained is None
    private = TwoStage(RankingConfig(n_factors=3, ranker=None, dp=UserLevelDP(1.0)))
    state, _ = run_family(private, clients, data.n_items, rounds=1, eval_splits=())
    assert private.servable(state).trained is None


def test_a_checkpoint_restores_every_part_of_the_state(sparse_items):
    data, clients, _, _ = sparse_items
    family = TwoStage(RankingConfig(n_factors=3, n_candidates=10, neighbours=10, ease_reg=20.0,
                                    ranker=RankerConfig(rounds=1, trees_per_round=2,
                                                        min_data_in_leaf=5)))  # fmt: skip
    state, _ = run_family(family, clients, data.n_items, rounds=1, eval_splits=())
    back = family.load_state(family.state_arrays(state))
    assert (back.round, back.stage, back.retrieval_key) == (
        state.round, state.stage, state.retrieval_key,
    )  # fmt: skip
    np.testing.assert_array_equal(back.factors, state.factors)
    np.testing.assert_array_equal(back.popularity, state.popularity)
    np.testing.assert_array_equal(back.ease, state.ease)
    assert (back.similarity != state.similarity).nnz == 0
    assert back.ensemble.members == state.ensemble.members and len(back.ensemble) > 0


def test_a_rounds_training_error_is_the_root_of_the_summed_squares_over_the_summed_rows():
    def update(metrics):
        return ClientUpdate(0, np.zeros(0, np.int64), np.zeros(0, np.int64), {}, metrics)

    figures = round_metrics(
        [update({"train_sse": 8.0, "train_n": 2.0}), update({"train_sse": 10.0, "train_n": 3.0})],
        1.5,
    )
    assert figures["train/rmse"] == pytest.approx(math.sqrt(18.0 / 5.0))
    assert (figures["system/clients"], figures["system/round_seconds"]) == (2.0, 1.5)
    assert "train/rmse" not in round_metrics([update({"train_sse": 0.0, "train_n": 0.0})], 1.0)
    assert "train/rmse" not in round_metrics([update({"train_n": 4.0})], 1.0)  # implicit ALS
    assert "train/rmse" not in round_metrics([update({"train_sse": 3.0})], 1.0)  # no row count
    one_row = round_metrics([update({"train_sse": 4.0, "train_n": 1.0})], 1.0)
    assert one_row["train/rmse"] == 2.0


def test_the_reference_loop_times_each_round_and_refuses_secure_sums_it_cannot_encode(sparse_items):
    from models.neural.family import Neural, NeuralConfig
    from models.neural.federated import FederatedConfig

    data, clients, _, _ = sparse_items
    family = TwoStage(RankingConfig(n_factors=3, ranker=None))
    started = time.perf_counter()
    _, steps = run_family(family, clients, data.n_items, rounds=2, eval_splits=())
    elapsed = time.perf_counter() - started
    assert all(0.0 < s["system/round_seconds"] <= elapsed for s in steps)
    assert EVERYONE_ROUND < 1  # its clients' streams are never a step's (steps count from 1)
    neural = Neural(
        NeuralConfig(kind="dae", hidden=(), latent=4, federated=FederatedConfig(rounds=1))
    )
    with pytest.raises(ValueError, match="the neural family has no secure-aggregation encoding"):
        run_family(neural, clients, data.n_items, rounds=1, secure_sum=lambda d: sum(d.values()))
    run_family(family, clients, data.n_items, rounds=1, eval_splits=(),
               secure_sum=lambda dense: np.sum(list(dense.values()), axis=0))  # fmt: skip


def test_the_served_model_has_the_network_once_it_trained_a_round(sparse_items):
    from models.neural.family import NeuralConfig
    from models.neural.federated import FederatedConfig

    data, clients, _, _ = sparse_items
    neural = NeuralConfig(kind="dae", hidden=(), latent=4, federated=FederatedConfig(rounds=1))
    family = TwoStage(RankingConfig(n_factors=3, n_candidates=10, neighbours=10, ranker=None,
                                    neural=neural))  # fmt: skip
    served = {}

    def on_phase(phase, state):
        served[phase.name] = family.servable(state).retrieval.network

    run_family(family, clients, data.n_items, rounds=1, eval_splits=(), on_phase=on_phase)
    assert served["knn"] is None  # not trained yet: no source of candidates
    params, _ = served["neural"]  # after one round it is
    assert params.keys() == family.initial_state(data.n_items, 0).network.params.keys()


def test_a_warm_start_takes_the_champions_factors_of_the_items_it_knows(sparse_items):
    """Items the champion has factors for start from them; an item new to the catalogue, or
    one the champion learnt nothing of (zero factors), keeps its fresh initial factors."""
    data, clients, unseen, _ = sparse_items
    config = RankingConfig(n_factors=3, ranker=None)
    ids = data.item_ids.astype(str)
    champion = TwoStage(config, ids)
    state, _ = run_family(champion, clients, data.n_items, rounds=1, eval_splits=())
    model = champion.servable(state)
    renamed = ids.copy()
    renamed[0] = "an item new to the catalogue"
    family = TwoStage(config, renamed)
    fresh = family.initial_state(data.n_items, 5)

    warm, known = family.warm_start(fresh, model)

    old = model.retrieval.item_factors
    learnt = np.abs(old).sum(axis=1) > 0
    assert not learnt[unseen]
    for item in range(data.n_items):
        kept = item == 0 or not learnt[item]
        expected = fresh.factors[item] if kept else old[item]
        np.testing.assert_array_equal(warm.factors[item], expected)
    assert known == int(learnt[1:].sum())
