"""The two-stage family's client and server steps at their edges, each against an oracle written
out here: users with a single row in a split or none in training, an item one user saw, a client
that trained on one item, the cached scores of a growing ensemble, the DP solve's ridge and count
floor, and which users are selection users."""

from __future__ import annotations

import math
from dataclasses import replace
from hashlib import blake2b

import numpy as np
import pandas as pd
import pytest

from models.client import SELECT, TEST, TRAIN, VALID, selection_users
from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.federation.evaluation import exclude_seen
from models.mf.als import RatingRows
from models.mf.implicit import CentralizedImplicitALS
from models.mf.linalg import pack_symmetric
from models.privacy.dp import UserLevelDP
from models.protocol import ClientUpdate
from models.ranking.boosting import RankerConfig, TreeEnsemble
from models.ranking.federated import (
    RankingConfig,
    evaluate_ranking,
    implicit_client_round,
    implicit_evaluate,
    implicit_server_update,
    init_item_factors,
    knn_client_update,
    noisy_popularity,
    ranker_client_data,
    ranker_client_round,
    ranker_server_update,
    run_two_stage,
)

# users 0, 1 and 2 and the rarest item are cut down to the rows named here
ONE_OF_EACH, NO_TRAINING, NO_TEST = 0, 1, 2


@pytest.fixture(scope="module")
def edges():
    """Synthetic implicit data whose random split is overridden at the edges: user 0 has one
    training, one validation and one test row; user 1 only validation and test rows; user 2 two
    training rows and one validation row; the rarest item one training row. User 0 is a client
    of its own (one training item); the rest are spread over four iid clients."""
    data = generate_synthetic(n_users=300, n_items=120, n_interactions=9000, seed=4,
                              side_features=True)  # fmt: skip
    frame = data.frame.assign(rating=1.0)
    users, items = frame["user"].to_numpy(), frame["item"].to_numpy()
    rare = int(np.argmin(np.bincount(items, minlength=data.n_items)))
    plan = {ONE_OF_EACH: [TRAIN, VALID, TEST], NO_TRAINING: [VALID, TEST],
            NO_TEST: [TRAIN, TRAIN, VALID]}  # fmt: skip
    keep = np.ones(len(frame), bool)
    for user, splits in plan.items():
        mine = np.flatnonzero((users == user) & (items != rare))
        keep[mine[len(splits) :]] = False
    rare_rows = np.flatnonzero((items == rare) & ~np.isin(users, list(plan)))
    keep[np.flatnonzero(items == rare)] = False
    keep[rare_rows[0]] = True
    frame = frame[keep].reset_index(drop=True)
    data = type(data)(frame, data.user_ids, data.item_ids,
                      user_features=data.user_features, item_features=data.item_features)  # fmt: skip
    split = split_rows(data, method="random", valid_fraction=0.15, test_fraction=0.15)
    users = frame["user"].to_numpy()
    for user, splits in plan.items():
        split[np.flatnonzero(users == user)] = splits
    split[np.flatnonzero(frame["item"].to_numpy() == rare)] = TRAIN
    owner = assign_clients(data, n_clients=4, strategy="iid", rng=np.random.default_rng(0))
    owner[ONE_OF_EACH] = 4
    return data, build_clients(data, owner, split), rare


@pytest.fixture(scope="module")
def trained(edges):
    data, clients, _ = edges
    config = RankingConfig(n_factors=4, n_candidates=20, neighbours=20, ease_reg=50.0,
                           ranker=RankerConfig(rounds=2, trees_per_round=3, min_data_in_leaf=10))  # fmt: skip
    return config, run_two_stage(
        clients, data.n_items, config, rounds=2, eval_splits=()
    ).recommender


def _users_with_rows(client, split: str) -> set[int]:
    return {int(u) for u in client.rows(split).users}


def _local(clients, user_id):
    """The client holding ``user_id`` and the user's local index there."""
    client = next(c for c in clients if user_id in c.user_ids)
    return client, int(np.flatnonzero(client.user_ids == user_id)[0])


def test_the_edge_users_and_the_rare_item_are_as_planned(edges):
    data, clients, rare = edges
    one, _ = _local(clients, data.user_ids[ONE_OF_EACH])
    assert len(one.user_ids) == 1 and one.rows("train").items.size == 1
    assert [len(one.rows(s)) for s in ("train", "valid", "test")] == [1, 1, 1]
    frame = data.frame
    assert (frame["item"] == rare).sum() == 1


def test_the_ranker_data_holds_the_recommenders_candidates_of_every_user_with_rows(edges, trained):
    """Each split's candidates are the retrieval model's for every user with a row in it (one
    row is enough), excluding what the split excludes; the labels mark the validation pairs among
    the candidates of the users who learn (a training row to rank from, not a selection user, at
    least one labelled candidate)."""
    data, clients, _ = edges
    base = replace(trained[1], ranker=None)
    for client in clients:
        history = client.matrix("train")
        with_history = _users_with_rows(client, "train")
        part = ranker_client_data(client, base, ("valid", SELECT, "test"))
        for split in ("valid", SELECT, "test"):
            users = np.array(sorted(_users_with_rows(client, split)), np.int64)
            expected = base.score_candidates(
                history, exclude_seen(client, split), client.user_features, users
            )[0]
            candidates, held = part.splits[split]
            assert held.tolist() == users.tolist(), split
            assert (candidates.users == expected.users).all(), split
            assert (candidates.items == expected.items).all(), split
            pd.testing.assert_frame_equal(candidates.features, expected.features)
        pairs = set(zip(client.rows("valid").users.tolist(), client.rows("valid").items.tolist(),
                        strict=True))  # fmt: skip
        pool = part.splits["valid"][0]
        learners = {u for u in _users_with_rows(client, "valid") & with_history
                    if not client.selected[u]}  # fmt: skip
        labelled = {u for u, i in zip(pool.users.tolist(), pool.items.tolist(), strict=True)
                    if u in learners and (u, i) in pairs}  # fmt: skip
        assert set(part.train.users.tolist()) == labelled
        expected_labels = [(u, i) in pairs for u, i in
                           zip(part.train.users.tolist(), part.train.items.tolist(), strict=True)]  # fmt: skip
        assert part.labels.tolist() == expected_labels
    splits = {}
    for user in (ONE_OF_EACH, NO_TRAINING, NO_TEST):
        client, local = _local(clients, data.user_ids[user])
        held = ranker_client_data(client, base, ("valid", "test")).splits
        splits[user] = {split: local in set(held[split][1].tolist()) for split in held}
    assert splits[ONE_OF_EACH] == {"valid": True, "test": True}  # one row of each is enough
    assert splits[NO_TRAINING] == {"valid": True, "test": True}  # counted, as evaluated
    assert splits[NO_TEST] == {"valid": True, "test": False}


def test_evaluating_several_splits_gives_each_what_it_gives_alone(edges, trained):
    """``select`` reuses ``valid``'s scores; no other split may, whatever the order, and every
    user with a row in the split counts (a single row included)."""
    _, clients, _ = edges
    model = trained[1]
    for client in clients:
        together = evaluate_ranking(client, model, ("valid", "test", SELECT), 10)
        for split in ("valid", "test", SELECT):
            alone = evaluate_ranking(client, model, (split,), 10)[split]
            assert together[split][0] == alone[0], split
            assert alone[0]["users"] == len(_users_with_rows(client, split)), split


def test_a_ranker_round_reports_the_served_models_figures_and_caches_the_right_scores(
    edges, trained
):
    """The sums a ranker round reports for the incoming ensemble are those of the served model
    with that ensemble (before any tree, by default: of implicit ALS, the last step's model);
    the scores it keeps between rounds equal a fresh prediction whether the ensemble grew,
    shrank back to a prefix or was replaced."""
    _, clients, _ = edges
    config, model = trained
    base = replace(model, ranker=None)
    parts = {c.client_id: ranker_client_data(c, base, ("valid", "test")) for c in clients}
    ensembles, ensemble = [TreeEnsemble()], TreeEnsemble()
    for round_ in range(2):
        updates = []
        for client in clients:
            part = parts[client.client_id]
            update, reported = ranker_client_round(client, part, ensemble, config, seed=round_)
            updates.append(update)
            if len(ensemble):
                served = replace(base, ranker=ensemble)
                expected = evaluate_ranking(client, served, ("valid", "test"), 10)
            else:
                factors = base.retrieval.item_factors
                expected = implicit_evaluate(client, factors, config, ("valid", "test"))
            for split in ("valid", "test"):
                assert reported[split][0] == pytest.approx(expected[split][0]), split
                # the items in some top-K list (coverage): of the same users
                np.testing.assert_array_equal(reported[split][1], expected[split][1])
            for earlier in (*ensembles, ensemble):
                fresh = earlier.predict(part.train.features) if len(earlier) else 0.0
                np.testing.assert_allclose(part.ensemble_scores("train", earlier), fresh)
        ensemble = ranker_server_update(ensemble, updates)
        ensembles.append(ensemble)
    other = ranker_server_update(
        TreeEnsemble(),
        [ranker_client_round(c, parts[c.client_id], TreeEnsemble(), config, seed=7)[0]
         for c in clients],
    )  # fmt: skip
    for client in clients:
        part = parts[client.client_id]
        for replaced in (ensembles[-1], other, ensembles[1]):
            np.testing.assert_allclose(
                part.ensemble_scores("test", replaced),
                replaced.predict(part.splits["test"][0].features),
            )


def test_federated_implicit_als_with_a_one_item_client_and_a_once_seen_item_is_centralized(edges):
    data, clients, rare = edges
    config = RankingConfig(n_factors=6, reg=0.5, alpha=3.0, init_std=0.1, ranker=None)
    result = run_two_stage(clients, data.n_items, config, rounds=3, seed=2)
    train = data.frame[_split_of(data, clients) == TRAIN]
    central = CentralizedImplicitALS(6, reg=0.5, alpha=3.0, n_iter=3, init_std=0.1, seed=2).fit(
        RatingRows(train["user"].to_numpy(), train["item"].to_numpy(), np.ones(len(train)),
                   n_users=data.n_users, n_items=data.n_items)
    )  # fmt: skip
    factors = result.recommender.retrieval.item_factors
    np.testing.assert_allclose(factors, central.item_params_.factors, atol=1e-8)
    assert np.abs(factors[rare]).sum() > 0  # solved from its one row


def _split_of(data, clients) -> np.ndarray:
    """Each row's split, read back from the clients (global user index, item) -> split."""
    lookup = {}
    for c in clients:
        position = np.searchsorted(data.user_ids, c.user_ids)
        for user, item, split in c.frame[["user", "item", "split"]].itertuples(index=False):
            lookup[(int(position[user]), int(item))] = int(split)
    return np.array([lookup[(u, i)] for u, i in
                     zip(data.frame["user"].to_numpy(), data.frame["item"].to_numpy(), strict=True)])  # fmt: skip


def test_a_clients_co_occurrence_update_names_every_item_it_trained_on(edges):
    _, clients, rare = edges
    for client in clients:
        items, counts = np.unique(client.rows("train").items, return_counts=True)
        update = knn_client_update(client)
        assert update.items.tolist() == items.tolist()
        assert update.counts.tolist() == counts.tolist()
    assert any(rare in knn_client_update(c).items for c in clients)


def test_an_implicit_round_counts_its_rows_only_without_dp(edges):
    _, clients, _ = edges
    client = clients[0]
    factors = init_item_factors(client.n_items, RankingConfig(n_factors=4, ranker=None), 0)
    plain = RankingConfig(n_factors=4, ranker=None)
    update, _ = implicit_client_round(client, factors, plain)
    assert update.metrics == {"train_n": float(len(client.rows("train")))}
    private = replace(plain, dp=UserLevelDP(noise_multiplier=1.0))
    update, _ = implicit_client_round(client, factors, private, rng=np.random.default_rng(0))
    assert "train_n" not in update.metrics  # under DP only the noised sums leave


def test_the_dp_item_solve_widens_the_ridge_and_zeroes_items_under_the_count_floor():
    """Every item is solved with ``reg + ridge_scale * noise * sqrt(k)`` (the noise is the
    statistics' standard deviation), and an item whose noisy count is under ``count_floor``
    noise deviations gets zero factors; one exactly at the floor keeps its solve."""
    k, n_items = 2, 5
    dp = UserLevelDP(noise_multiplier=0.5, ridge_scale=3.0, count_floor=4.0)
    config = RankingConfig(n_factors=k, reg=0.7, alpha=2.0, ranker=None, dp=dp)
    noise = 0.5 * dp.implicit_sensitivity(2.0)
    floor = dp.count_floor * noise
    counts = np.array([floor, floor - 1e-6, 10 * floor, -1.0, 0.0])
    rng = np.random.default_rng(3)
    blocks = rng.normal(size=(n_items, k, k))
    grams = np.einsum("nij,nkj->nik", blocks, blocks)  # symmetric positive semi-definite
    rhs = rng.normal(size=(n_items, k))
    user_gram = np.array([[0.2, 0.05], [0.05, 0.1]])
    update = ClientUpdate(0, np.arange(n_items), counts,
                          {"gram": pack_symmetric(grams), "rhs": rhs, "user_gram": user_gram})  # fmt: skip

    factors = implicit_server_update(np.zeros((n_items, k)), [update], config)

    reg = 0.7 + 3.0 * noise * math.sqrt(k)
    for item in range(n_items):
        solved = np.linalg.solve(user_gram + grams[item] + reg * np.eye(k), rhs[item])
        expected = solved if counts[item] >= floor else np.zeros(k)
        np.testing.assert_allclose(factors[item], expected, atol=1e-10)


def test_noisy_popularity_is_floored_at_zero_not_above():
    update = ClientUpdate(0, np.arange(3), np.array([-2.5, 0.0, 3.25]))
    assert noisy_popularity([update], 4).tolist() == [0.0, 0.0, 3.25, 0.0]


def test_ranking_config_takes_the_smallest_allowed_values_and_refuses_the_rest():
    smallest = RankingConfig(n_factors=1, neighbours=1, n_candidates=1, top_k=1, reg=1e-9,
                             alpha=1e-9, init_std=1e-9, shrink=0.0)  # fmt: skip
    assert smallest.n_factors == 1
    for name in ("n_factors", "neighbours", "n_candidates", "top_k"):
        with pytest.raises(ValueError, match=f"{name}=0 must be >= 1"):
            RankingConfig(**{name: 0})
    for name in ("reg", "alpha", "init_std"):
        with pytest.raises(ValueError, match=f"{name}=0.0 must be > 0"):
            RankingConfig(**{name: 0.0})
    with pytest.raises(ValueError, match="differential privacy covers implicit ALS only"):
        RankingConfig(dp=UserLevelDP(noise_multiplier=1.0))
    assert RankingConfig(dp=UserLevelDP(noise_multiplier=1.0), ranker=None).dp is not None


def test_the_starting_item_factors_are_centred_with_the_configured_spread():
    factors = init_item_factors(4000, RankingConfig(n_factors=8, init_std=0.05, ranker=None), 1)
    assert factors.shape == (4000, 8)
    assert abs(factors.mean()) < 0.05 * 4 / math.sqrt(factors.size)
    assert factors.std() == pytest.approx(0.05, rel=0.02)


def test_selection_users_are_the_ids_whose_hash_falls_in_the_first_fifth_of_buckets():
    """Written out with hashlib: BLAKE2b-64 of the id as text, personalised, modulo 1000, under
    200; ids 1..5000 include buckets 199 and 200 themselves."""
    ids = np.arange(1, 5001)
    buckets = np.array([
        int.from_bytes(blake2b(str(u).encode(), digest_size=8, person=b"fedrec-select").digest(),
                       "big") % 1000
        for u in ids
    ])  # fmt: skip
    assert {199, 200} <= set(buckets.tolist())
    assert (selection_users(ids) == (buckets < 200)).all()


def test_a_rating_at_the_threshold_counts_as_a_positive(edges):
    data, _, _ = edges
    frame = data.frame.assign(rating=np.resize([2.0, 3.0, 4.0], len(data.frame)))
    rated = type(data)(frame, data.user_ids, data.item_ids)
    owner = np.zeros(rated.n_users, np.int64)
    split = np.zeros(len(frame), np.int64)
    client = build_clients(rated, owner, split)[0]
    ratings = client.rows("train").ratings
    assert client.matrix("train", min_rating=3.0).nnz == int((ratings >= 3.0).sum())
    assert client.matrix("train", min_rating=3.0).nnz > client.matrix("train", min_rating=4.0).nnz


def test_each_round_records_the_model_of_the_step_before_as_the_reference_loop_evaluates_it(edges):
    """The flow evaluates step ``s``'s model in step ``s + 1``'s client rounds. Across every
    phase of the two-stage family (implicit ALS, the co-occurrence round, the network, the
    re-ranker), what those rounds report must be the reference loop's evaluation of the state
    right after step ``s``: the co-occurrence round is no step, so the rounds right after it
    still record the last implicit-ALS step."""
    from models.federation.evaluation import summarize_splits
    from models.federation.sampling import round_rng
    from models.neural.family import NeuralConfig
    from models.neural.federated import FederatedConfig
    from models.ranking.family import TwoStage

    data, clients, _ = edges
    neural = NeuralConfig(kind="dae", hidden=(), latent=8, federated=FederatedConfig(rounds=2))
    config = RankingConfig(n_factors=4, n_candidates=20, neighbours=20, ease_reg=50.0,
                           neural=neural, ranker=RankerConfig(rounds=2, trees_per_round=3,
                                                              min_data_in_leaf=10))  # fmt: skip
    family = TwoStage(config)
    splits = family.eval_splits

    def summary(parts):
        metrics = summarize_splits(parts, 10, data.n_items)
        return {k: v for k, v in metrics.items() if not k.startswith("baseline/")}

    state, step, expected, checked = family.initial_state(data.n_items, 0), 0, None, []
    for phase in family.phases(2):
        for _ in range(phase.rounds):
            answers = [
                family.client_round(c, state, phase.name, round_rng(0, step + 1, c.client_id,
                                                                    private=False), splits)
                for c in clients
            ]  # fmt: skip
            if not phase.everyone:
                if expected is not None:  # what this round reports of the step before
                    assert summary([a[1] for a in answers]) == pytest.approx(expected), step
                    checked.append(phase.name)
                step += 1
            state = family.server_update(state, [a[0] for a in answers], phase.name)
            if not phase.everyone:  # the reference loop: evaluated right after the step
                expected = summary([family.evaluate(c, state, splits) for c in clients])
    assert checked == ["als", "neural", "neural", "ranker", "ranker"]
