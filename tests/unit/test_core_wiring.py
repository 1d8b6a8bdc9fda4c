"""The core rounds are wired as documented, against oracles that do not share their code: exact
federated ALS solves an item rated once (equal to centralized ALS), the proximal term reaches
FedProx's local SGD and no other algorithm's, FedAdam and FedYogi step the count-weighted
mean change by their own rule and settings, the test split's ranking excludes the validation
items (hits counted by hand), the private item solves of explicit and implicit ALS use the
documented ridge (``reg`` per count plus ``ridge_scale`` noise deviations x ``sqrt(k)``) and
count floor (``count_floor`` noise deviations of the summed channel) against dense per-item
solves, the robust screen ranks clients by their mean (not summed) squared distance, the
reference loop samples step ``s`` with ``sample_clients(n, f, seed, s)`` and evaluates every
client, and the neural round loss is the user-weighted mean of the clients' losses."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from models.client import SPLIT, TEST, TRAIN, VALID, ClientData
from models.data.schema import ITEM, RATING, USER
from models.federation.family import Phase
from models.federation.loop import run_family
from models.federation.sampling import sample_clients
from models.mf.als import CentralizedALS, RatingRows, solve_users
from models.mf.federated import (
    GlobalState,
    MFConfig,
    client_rating_sums,
    client_update,
    evaluate_client,
    init_global_state,
    server_update,
)
from models.mf.linalg import pack_symmetric
from models.mf.params import ItemParams
from models.mf.sgd import train_local_sgd
from models.neural.federated import (
    FederatedConfig,
    client_rng,
    run_federated,
)
from models.neural.federated import client_update as neural_client_update
from models.neural.network import Architecture, init_params
from models.neural.training import TrainConfig
from models.privacy.dp import UserLevelDP
from models.protocol import ClientUpdate
from models.ranking.federated import RankingConfig, implicit_server_update
from models.robust import screen_clients


def _client(client_id, users, items, ratings, n_items, splits=None):
    users = np.asarray(users)
    splits = np.full(users.size, TRAIN) if splits is None else np.asarray(splits)
    frame = pd.DataFrame(
        {USER: users, ITEM: np.asarray(items), RATING: np.asarray(ratings, float), SPLIT: splits}
    )
    return ClientData(client_id, np.arange(users.max() + 1), n_items, frame)


def _random_rows(n_users, n_items, density, rng):
    mask = rng.random((n_users, n_items)) < density
    mask[np.arange(n_users), rng.integers(0, n_items, n_users)] = True  # every user has a row
    users, items = np.nonzero(mask)
    return users, items, rng.integers(1, 6, users.size).astype(float)


# --- exact federated ALS -----------------------------------------------------------------
def test_federated_als_solves_an_item_rated_once_like_centralized_als():
    rng = np.random.default_rng(11)
    n_items = 12
    clients, offset, pooled = [], 0, []
    for c in range(2):
        users, items, ratings = _random_rows(15, n_items - 1, 0.5, rng)  # item 11: nobody yet
        if c == 0:  # ... but user 3 of client 0, once
            users, items, ratings = (
                np.append(users, 3),
                np.append(items, n_items - 1),
                np.append(ratings, 5.0),
            )
        clients.append(_client(c, users, items, ratings, n_items))
        pooled.append((users + offset, items, ratings))
        offset += 15
    users, items, ratings = (np.concatenate(p) for p in zip(*pooled, strict=True))
    assert np.sum(items == n_items - 1) == 1
    config = MFConfig(algorithm="als", n_factors=3, reg=0.05)

    state = init_global_state(n_items, config, [client_rating_sums(c) for c in clients], 7)
    start = state.params.factors[n_items - 1].copy()
    for r in range(4):
        updates = [
            client_update(c, state.params, config, np.random.default_rng(r)) for c in clients
        ]
        state = server_update(state, updates, config)
    central = CentralizedALS(n_factors=3, reg=0.05, n_iter=4, seed=7).fit(
        RatingRows(users, items, ratings, n_users=offset, n_items=n_items)
    )

    np.testing.assert_allclose(
        state.params.factors, central.item_params_.factors, atol=1e-8, rtol=0
    )
    np.testing.assert_allclose(state.params.bias, central.item_params_.bias, atol=1e-8, rtol=0)
    assert np.abs(state.params.factors[n_items - 1] - start).max() > 1e-3  # it was solved


# --- the proximal term -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("algorithm", "uses_prox"),
    [("fedprox", True), ("fedavg", False), ("fedadam", False), ("fedyogi", False)],
)
def test_client_update_applies_the_proximal_term_to_fedprox_only(algorithm, uses_prox):
    rng = np.random.default_rng(2)
    users, items, ratings = _random_rows(10, 15, 0.5, rng)
    client = _client(0, users, items, ratings, 15)
    config = MFConfig(
        algorithm=algorithm, n_factors=3, prox_mu=0.5, local_epochs=4, local_lr=0.05, batch_size=8
    )
    params = init_global_state(15, config, [client_rating_sums(client)], seed=1).params
    rows = client.rows("train")
    touched = np.unique(rows.items)

    def local_sgd(prox_mu):
        return train_local_sgd(
            rows,
            params.stacked()[touched],
            params.global_mean,
            solve_users(rows, params, reg=config.reg),
            touched,
            epochs=config.local_epochs,
            lr=config.local_lr,
            reg=config.reg,
            batch_size=config.batch_size,
            prox_mu=prox_mu,
            rng=np.random.default_rng(5),
        )

    update = client_update(client, params, config, np.random.default_rng(5))

    with_prox, without = local_sgd(config.prox_mu), local_sgd(0.0)
    assert np.abs(with_prox - without).max() > 1e-4  # the term matters on these inputs
    np.testing.assert_array_equal(update.items, touched)
    np.testing.assert_allclose(
        update.arrays["delta"], with_prox if uses_prox else without, atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi"])
def test_the_adaptive_algorithms_step_the_weighted_mean_delta_by_their_own_rule(algorithm):
    """Two rounds of two clients against a by-hand oracle: the count-weighted mean change of each
    touched item (np.average), then Reddi et al.'s Adam or Yogi step with the configured settings
    (none of them the default); the untouched item keeps its values and its moments."""
    lr, b1, b2, tau = 0.1, 0.8, 0.95, 1e-2
    config = MFConfig(algorithm=algorithm, n_factors=1, server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    state = init_global_state(3, config, [{"rating_sum": 7.0, "n": 2.0}], seed=0)
    start = state.params.stacked()
    rounds = [
        (np.array([[0.2, -0.1], [0.4, 0.3]]), np.array([[-0.2, 0.5]])),
        (np.array([[-0.3, 0.2], [0.1, -0.6]]), np.array([[0.8, 0.1]])),
    ]
    x, m, v = start.copy(), np.zeros_like(start), np.full_like(start, tau * tau)
    for a, b in rounds:
        updates = [
            ClientUpdate(0, np.array([0, 1]), np.array([3, 1]), {"delta": a}),
            ClientUpdate(1, np.array([1]), np.array([2]), {"delta": b}),
        ]
        state = server_update(state, updates, config)

        d = np.stack([a[0], np.average([a[1], b[0]], axis=0, weights=[1, 2])])
        m[:2] = b1 * m[:2] + (1 - b1) * d
        if algorithm == "fedadam":
            v[:2] = b2 * v[:2] + (1 - b2) * d * d
        else:
            v[:2] = v[:2] - (1 - b2) * d * d * np.sign(v[:2] - d * d)
        x[:2] = x[:2] + lr * m[:2] / (np.sqrt(v[:2]) + tau)
        np.testing.assert_allclose(state.params.stacked(), x, rtol=1e-12)
        np.testing.assert_allclose(state.optimizer.first, m, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state.optimizer.second, v, rtol=1e-12)
    np.testing.assert_array_equal(state.params.stacked()[2], start[2])
    assert state.params.global_mean == 3.5 and state.round == 2


# --- the test split's ranking ------------------------------------------------------------------
def test_test_split_ranking_excludes_training_and_validation_items():
    n_items, k = 8, 2
    # item i's score is its bias (zero factors): the validation item 7 would rank first
    bias = np.linspace(0.0, 0.7, n_items)
    params = ItemParams(np.zeros((n_items, 2)), bias, 3.0)
    rows = [  # (user, item, rating, split)
        (0, 0, 3, TRAIN), (0, 1, 4, TRAIN), (0, 7, 5, VALID), (0, 5, 5, TEST),
        (1, 2, 2, TRAIN), (1, 6, 5, TRAIN), (1, 7, 5, VALID), (1, 4, 5, TEST), (1, 3, 4, TEST),
        (2, 0, 1, TRAIN), (2, 7, 4, VALID), (2, 6, 5, VALID), (2, 4, 5, TEST), (2, 1, 2, TEST),
    ]  # fmt: skip
    users, items, ratings, splits = (np.array(c) for c in zip(*rows, strict=True))
    client = _client(0, users, items, ratings, n_items, splits)
    config = MFConfig(algorithm="als", n_factors=2, top_k=k, relevance_threshold=4.0)

    sums, _ = evaluate_client(client, params, config, "test")

    seen = np.zeros((3, n_items), bool)
    relevant = np.zeros((3, n_items), bool)
    for u, i, r, s in rows:
        seen[u, i] |= s in (TRAIN, VALID)
        relevant[u, i] |= s == TEST and r >= 4.0
    scores = np.where(seen, -np.inf, np.broadcast_to(bias, seen.shape))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(relevant, top, 1).sum(axis=1)
    n_rel = relevant.sum(axis=1)
    assert hits.tolist() == [1, 1, 1]  # the validation items would have displaced each hit
    assert sums["users"] == 3
    assert sums["precision"] == pytest.approx(hits.sum() / k)
    assert sums["recall"] == pytest.approx(np.sum(hits / n_rel))
    assert sums["hit"] == pytest.approx(np.sum(hits > 0))


# --- private item solves -------------------------------------------------------------------------
def _noisy_item_sums(counts, k, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, (counts.size, k, k))
    grams = a @ np.swapaxes(a, 1, 2) + np.eye(k)  # PSD: the projection leaves it alone
    rhs = rng.normal(0.0, 3.0, (counts.size, k))
    return grams, rhs


def _two_shares(counts, grams, rhs, user_gram=None):
    """The summed statistics split between two clients' updates: a quarter of items 0-3 on the
    first, the rest of every item on the second (the server must add them up)."""
    n_items = counts.size
    first = np.arange(4)
    rest = np.where(np.isin(np.arange(n_items), first), 0.75, 1.0)
    updates = []
    for c, (items, w, u) in enumerate(
        [(first, np.full(4, 0.25), 0.25), (np.arange(n_items), rest, 0.75)]
    ):
        arrays = {
            "gram": pack_symmetric(grams[items] * w[:, None, None]),
            "rhs": rhs[items] * w[:, None],
        }
        if user_gram is not None:
            arrays["user_gram"] = user_gram * u
        updates.append(ClientUpdate(c, items.astype(np.int64), counts[items] * w, arrays))
    return updates


def test_private_explicit_als_server_step_uses_documented_ridge_and_count_floor():
    k = 3
    dp = UserLevelDP(noise_multiplier=0.3, max_items=4, shares=2)
    config = MFConfig(algorithm="als", n_factors=k, reg=0.5, dp=dp)
    total = dp.noise_multiplier * dp.factor_sensitivity  # deviation of every summed value
    floor = dp.count_floor * total
    counts = np.array([floor - 0.01, floor + 0.01, 3 * floor, 10 * floor, -1.0, 0.5 * floor])
    grams, rhs = _noisy_item_sums(counts, k, seed=3)
    params = ItemParams(np.full((counts.size, k), 0.2), np.zeros(counts.size), 3.0)
    updates = _two_shares(counts, grams, rhs)

    factors = server_update(GlobalState(params), updates, config).params.factors

    extra = dp.ridge_scale * total * math.sqrt(k)
    expected = np.zeros((counts.size, k))
    for i in np.flatnonzero(counts >= floor):
        ridge = config.reg * counts[i] + extra
        expected[i] = np.linalg.solve(grams[i] + ridge * np.eye(k), rhs[i])
    assert np.all(expected[[1, 2, 3]] != 0) and np.all(expected[[0, 4, 5]] == 0)
    np.testing.assert_allclose(factors, expected, atol=1e-10, rtol=1e-8)


def test_private_implicit_server_update_uses_documented_ridge_and_count_floor():
    k, n_items = 3, 6
    dp = UserLevelDP.for_implicit(noise_multiplier=0.3, max_items=4, shares=2)
    config = RankingConfig(n_factors=k, reg=2.0, alpha=1.0, ranker=None, dp=dp)
    noise = dp.noise_multiplier * dp.implicit_sensitivity(config.alpha)  # of every summed value
    floor = dp.count_floor * noise
    counts = np.array([floor - 0.01, floor + 0.01, 3 * floor, 10 * floor, -1.0, 0.5 * floor])
    grams, rhs = _noisy_item_sums(counts, k, seed=4)
    user_gram = np.diag([2.0, 1.0, 0.5])
    updates = _two_shares(counts, grams, rhs, user_gram)

    factors = implicit_server_update(np.zeros((n_items, k)), updates, config)

    ridge = config.reg + dp.ridge_scale * noise * math.sqrt(k)
    expected = np.zeros((n_items, k))
    for i in np.flatnonzero(counts >= floor):
        expected[i] = np.linalg.solve(grams[i] + user_gram + ridge * np.eye(k), rhs[i])
    assert np.all(expected[[1, 2, 3]] != 0) and np.all(expected[[0, 4, 5]] == 0)
    np.testing.assert_allclose(factors, expected, atol=1e-10, rtol=1e-8)


# --- robust screening ------------------------------------------------------------------------------
def test_screen_drops_the_client_farthest_in_mean_not_summed_squared_distance():
    n_items, k = 12, 2
    median = np.zeros((n_items, k))
    checked = np.ones(n_items, bool)
    honest_items = np.arange(10)  # many items, each row at squared distance 0.1
    honest = np.tile([math.sqrt(0.1), 0.0], (10, 1))
    attacker_items = np.array([10])  # one item at squared distance 0.5
    attacker = np.array([[0.0, math.sqrt(0.5)]])
    other_items = np.array([10, 11])  # two items at squared distance 0.05
    other = np.tile([math.sqrt(0.05), 0.0], (2, 1))
    contributions = [
        (honest_items, honest, np.ones(10)),
        (attacker_items, attacker, np.ones(1)),
        (other_items, other, np.ones(2)),
    ]

    kept = screen_clients(contributions, median, checked, drop=1)

    mean_distance = [
        np.mean(np.sum((v - median[i]) ** 2, axis=1)) for i, v, _ in contributions
    ]  # 0.1, 0.5, 0.05; summed they would be 1.0, 0.5, 0.1
    assert kept == sorted(np.argsort(mean_distance)[:2].tolist()) == [0, 2]


# --- the reference loop ----------------------------------------------------------------------------
class _SpyFamily:
    """Records which clients train and evaluate after which step; the state counts steps."""

    name, top_k, eval_splits, private = "spy", 10, ("valid",), False

    def __init__(self):
        self.trained: dict[int, list[int]] = {}
        self.evaluated: dict[int, list[int]] = {}

    def phases(self, rounds):
        return [Phase("train", rounds)]

    def initial_state(self, n_items, seed):
        return 0

    def client_round(self, client, state, phase, rng, eval_splits):
        self.trained.setdefault(state + 1, []).append(client.client_id)
        empty = np.zeros(0, np.int64)
        return ClientUpdate(client.client_id, empty, empty), {}

    def server_update(self, state, updates, phase):
        return state + 1

    def evaluate(self, client, state, splits):
        self.evaluated.setdefault(state, []).append(client.client_id)
        return {}


def test_reference_loop_samples_step_s_with_seed_step_s_and_evaluates_every_client():
    n, fraction, seed, rounds = 10, 0.3, 5, 4
    clients = [_client(c, [0], [0], [3.0], 2) for c in range(n)]
    family = _SpyFamily()

    _, history = run_family(family, clients, 2, rounds=rounds, seed=seed, client_fraction=fraction)

    expected = {s: sample_clients(n, fraction, seed, s).tolist() for s in range(1, rounds + 1)}
    assert any(  # a loop seeded with step - 1 would pick other clients
        expected[s] != sample_clients(n, fraction, seed, s - 1).tolist() for s in expected
    )
    assert family.trained == expected
    assert all(len(ids) == 3 for ids in expected.values())
    assert family.evaluated == {s: list(range(n)) for s in range(1, rounds + 1)}
    assert [h["step"] for h in history] == [1.0, 2.0, 3.0, 4.0]


# --- the neural round loss ---------------------------------------------------------------------
def test_neural_round_loss_is_the_user_weighted_mean_of_client_losses():
    arch = Architecture(n_items=7, kind="dae", hidden=(), latent=4)
    rng = np.random.default_rng(0)
    histories = [
        sparse.csr_matrix((rng.random((n, arch.n_items)) < 0.4).astype(float)) for n in (3, 12, 40)
    ]
    config = TrainConfig(learning_rate=1e-2, batch_size=4)
    start = init_params(arch, np.random.default_rng(0))
    reported = []

    run_federated(
        start,
        arch,
        histories,
        config,
        FederatedConfig(rounds=1, local_epochs=1),
        seed=9,
        on_round=lambda stats, _: reported.append(stats.loss),
    )

    updates = [
        neural_client_update(
            start, arch, h, config, local_epochs=1, start_epoch=0, rng=client_rng(9, 1, c)
        )
        for c, h in enumerate(histories)
    ]
    losses = np.array([u.loss for u in updates])
    users = np.array([u.users for u in updates])
    assert len(set(users.tolist())) == 3 and users.min() > 0
    assert abs(np.mean(losses) - np.average(losses, weights=users)) > 1e-4  # weighting matters
    assert reported == [pytest.approx(np.average(losses, weights=users), rel=1e-9)]


def test_a_rounds_system_counts_tell_clients_from_the_cohort_tasks_that_carried_them():
    """Each update of a per-user run is a cohort's: ``system/clients`` counts the users it
    carried, ``system/client_tasks`` the tasks; a plain round's updates are one client each and
    log no task count."""
    from models.protocol import ClientUpdate
    from tasks.server import round_summary

    def update(i: int, **metrics: float) -> ClientUpdate:
        return ClientUpdate(i, np.array([i]), np.array([2]), {"delta": np.ones((1, 3))}, metrics)

    plain = round_summary([update(0), update(1), update(2)], [], 10, 5, 1.5)
    cohorts = round_summary([update(0, clients=40.0), update(1, clients=25.0)], [], 10, 5, 2.0)

    assert plain["system/clients"] == 3.0 and "system/client_tasks" not in plain
    assert (cohorts["system/clients"], cohorts["system/client_tasks"]) == (65.0, 2.0)
    expected = sum(u.nbytes() for u in (update(0), update(1), update(2)))
    assert plain["system/bytes_uploaded"] == expected and plain["system/round_seconds"] == 1.5
    assert round_summary([], [], 10, 5, 1.0) == {}  # no update: no system counts
