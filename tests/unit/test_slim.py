"""ADMM SLIM: the ADMM iterations against a direct solve of each column's constrained problem,
federated against centralized, and as features and saved state of the two-stage recommender."""

import dataclasses

import numpy as np
import pytest
from scipy import optimize, sparse

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.ranking.family import TwoStage
from models.ranking.features import Retrieval, candidate_features
from models.ranking.federated import RankingConfig, knn_client_update, run_two_stage
from models.ranking.recommender import RankingRecommender, align_recommender
from models.ranking.slim import SlimConfig, federated_slim_weights, slim_scores, slim_weights
from tests.unit.helpers import pooled_train_matrix


def _column_oracle(x: np.ndarray, config: SlimConfig) -> np.ndarray:
    """Each column j on its own: min 1/2 ||x_j - X b||^2 + 1/2 sum_k l2 d_k b_k^2 + l1 sum_k b_k
    over b >= 0 with b_j = 0 (d = item means ** alpha), by L-BFGS-B."""
    n = x.shape[1]
    gram = x.T @ x
    d = config.l2 * (x.mean(axis=0) ** config.alpha)
    out = np.zeros((n, n))
    for j in range(n):
        others = np.delete(np.arange(n), j)
        g, h = gram[np.ix_(others, others)] + np.diag(d[others]), gram[others, j]

        def loss(b, g=g, h=h):
            return 0.5 * b @ g @ b - h @ b + config.l1 * b.sum(), g @ b - h + config.l1

        fit = optimize.minimize(
            loss, np.zeros(n - 1), jac=True, method="L-BFGS-B",
            bounds=[(0.0, None)] * (n - 1), options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000},
        )  # fmt: skip
        out[others, j] = fit.x
    return out


def test_admm_iterations_reach_the_constrained_solution():
    rng = np.random.default_rng(0)
    x = (rng.random((80, 10)) < 0.35).astype(float)
    config = SlimConfig(l1=2.0, l2=30.0, alpha=1.0, rho=20.0, iterations=3000)

    weights = slim_weights(x.T @ x, x.shape[0], config).toarray()

    oracle = _column_oracle(x, config)
    np.testing.assert_allclose(weights, oracle, atol=2e-4)
    assert np.all(np.diag(weights) == 0.0) and np.all(weights >= 0.0)
    assert (oracle == 0).sum() > 5  # l1 and the bound make it sparse: the test sees both
    assert (oracle > 0.01).sum() > 5


def test_bad_settings_and_inputs_give_one_clear_error():
    with pytest.raises(ValueError, match=r"rho=0\.0 must be a finite number > 0"):
        SlimConfig(rho=0.0)
    with pytest.raises(ValueError, match=r"l1=-1\.0 must be a finite number >= 0"):
        SlimConfig(l1=-1.0)
    with pytest.raises(ValueError, match="iterations=0 must be >= 1"):
        SlimConfig(iterations=0)
    with pytest.raises(ValueError, match="square item Gram matrix"):
        slim_weights(np.ones((3, 4)), 5, SlimConfig())
    with pytest.raises(ValueError, match="n_users=0 must be >= 1"):
        slim_weights(np.eye(3), 0, SlimConfig())


def test_a_single_users_counts_give_the_constrained_solution():
    """One user is enough data: ADMM SLIM of a 1-user Gram matrix (item means 0 or 1) still
    reaches each column's constrained least squares."""
    x = np.array([[1.0, 1.0, 1.0, 0.0, 1.0]])
    config = SlimConfig(l1=0.1, l2=2.0, alpha=1.0, rho=5.0, iterations=3000)

    weights = slim_weights(x.T @ x, 1, config).toarray()

    np.testing.assert_allclose(weights, _column_oracle(x, config), atol=2e-4)
    assert weights[3].sum() == 0.0 and weights[:, 3].sum() == 0.0


def test_one_admm_iteration_is_the_thresholded_ridge_step():
    """From C = Gamma = 0 the first iteration is the equality-constrained ridge solution
    ``B = P G - P diag(diag(P G) / diag(P))`` with ``P = (G + l2 D + rho I)^-1``, soft-thresholded
    at ``l1 / rho`` and clipped at 0 (the update of the module docstring, in float64 here)."""
    rng = np.random.default_rng(3)
    x = (rng.random((30, 7)) < 0.4).astype(float)
    config = SlimConfig(l1=0.5, l2=4.0, alpha=0.5, rho=3.0, iterations=1)
    gram = x.T @ x
    precision = np.linalg.inv(gram + np.diag(config.l2 * x.mean(axis=0) ** 0.5 + config.rho))
    ridge = precision @ gram
    ridge -= precision * (np.diag(ridge) / np.diag(precision))[None, :]
    expected = np.maximum(ridge - config.l1 / config.rho, 0.0)
    np.fill_diagonal(expected, 0.0)

    weights = slim_weights(gram, x.shape[0], config).toarray()

    np.testing.assert_allclose(weights, expected, atol=1e-5)
    assert (expected > 0).sum() > 3 and (expected[~np.eye(7, dtype=bool)] == 0).sum() > 3


def test_zero_penalties_and_a_small_rho_are_allowed_and_reach_the_constrained_solution():
    """l1, l2 and alpha may be 0 (no L1, no L2, a uniform L2 weight) and rho any number > 0:
    the weights are still each column's non-negative least squares with diag(B) = 0."""
    rng = np.random.default_rng(5)
    x = (rng.random((120, 6)) < 0.5).astype(float)
    for config in (
        SlimConfig(l1=0.0, l2=0.0, alpha=1.0, rho=20.0, iterations=3000),
        SlimConfig(l1=1.0, l2=10.0, alpha=0.0, rho=0.5, iterations=3000),
    ):
        weights = slim_weights(x.T @ x, x.shape[0], config).toarray()

        np.testing.assert_allclose(weights, _column_oracle(x, config), atol=5e-4)


@pytest.fixture(scope="module")
def implicit():
    data = generate_synthetic(
        n_users=200, n_items=60, n_interactions=3000, seed=7, side_features=True
    )
    data = type(data)(
        data.frame.assign(rating=1.0), data.user_ids, data.item_ids,
        user_features=data.user_features, item_features=data.item_features,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    owner = assign_clients(data, n_clients=5, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    return data, build_clients(data, owner, split)


CONFIG = SlimConfig(l1=1.0, l2=50.0, rho=40.0, iterations=30)


def test_federated_slim_from_client_sums_equals_centralized(implicit):
    data, clients = implicit
    x = pooled_train_matrix(data, clients)
    n_users = int(np.count_nonzero(np.diff(x.indptr)))
    central = slim_weights((x.T @ x).toarray(), n_users, CONFIG)

    # the statistics item-kNN sends, with each client's user count as it sends it for ADMM SLIM
    updates = [knn_client_update(c, count_users=True) for c in clients]
    federated = federated_slim_weights(
        [u.arrays for u in updates], data.n_items,
        int(sum(u.metrics["users"] for u in updates)), CONFIG,
    )  # fmt: skip

    assert sum(u.metrics["users"] for u in updates) == n_users
    assert knn_client_update(clients[0]).metrics == {}  # without ADMM SLIM: no count sent
    assert federated.nnz > 0
    np.testing.assert_allclose(federated.toarray(), central.toarray(), atol=1e-6)


def test_slim_scores_the_candidates_and_is_saved_with_the_model(tmp_path, implicit):
    data, clients = implicit
    config = RankingConfig(n_factors=4, n_candidates=5, neighbours=20, ranker=None, slim=CONFIG)

    model = run_two_stage(clients, data.n_items, config, rounds=2, eval_splits=()).recommender

    x = pooled_train_matrix(data, clients)
    n_users = int(np.count_nonzero(np.diff(x.indptr)))
    expected_weights = slim_weights((x.T @ x).toarray(), n_users, CONFIG)
    np.testing.assert_allclose(
        model.retrieval.slim.toarray(), expected_weights.toarray(), atol=1e-6
    )
    history = clients[0].matrix("train")
    users = np.flatnonzero(np.diff(history.indptr) > 0)
    candidates = candidate_features(model.retrieval, history, history, users=users)
    expected = np.where(
        history[users].toarray() > 0, -np.inf, slim_scores(history[users], model.retrieval.slim)
    )
    without = candidate_features(
        dataclasses.replace(model.retrieval, slim=None), history, history, users=users
    )
    # SLIM scores the other models' candidates and adds none
    np.testing.assert_array_equal(candidates.users, without.users)
    np.testing.assert_array_equal(candidates.items, without.items)
    row = np.searchsorted(users, candidates.users)
    np.testing.assert_allclose(
        candidates.features["slim_score"].to_numpy(), expected[row, candidates.items]
    )
    assert candidates.features["slim_rank"].min() == 1.0
    assert np.isfinite(candidates.features["slim_z"]).all()
    assert without.features["slim_score"].isna().all()

    model.save(tmp_path / "m")
    loaded = RankingRecommender.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.retrieval.slim.toarray(), model.retrieval.slim.toarray())
    reversed_ids = model.item_ids[::-1]
    aligned = align_recommender(model, reversed_ids)
    np.testing.assert_array_equal(
        aligned.retrieval.slim.toarray(), model.retrieval.slim.toarray()[::-1, ::-1]
    )


def test_server_state_keeps_slim_across_save_and_load(implicit):
    data, clients = implicit
    family = TwoStage(RankingConfig(n_factors=4, neighbours=20, ranker=None, slim=CONFIG))
    state = family.initial_state(data.n_items, seed=0)
    updates = [knn_client_update(c, count_users=True) for c in clients]

    state = family.server_update(state, updates, "knn")
    restored = family.load_state(family.state_arrays(state))

    assert isinstance(state.slim, sparse.csr_matrix) and state.slim.nnz > 0
    np.testing.assert_array_equal(restored.slim.toarray(), state.slim.toarray())
    retrieval: Retrieval = family.servable(restored).retrieval
    np.testing.assert_array_equal(retrieval.slim.toarray(), state.slim.toarray())


def test_slim_is_on_with_the_re_ranker_by_default_and_off_without_it():
    from fedrec.config import TrainingConfig

    def slim(**fields):
        return TrainingConfig(feedback="implicit", **fields).ranking_config().slim

    assert slim(ranker="lightgbm") == SlimConfig(iterations=40)
    assert slim(ranker="lightgbm", slim_iterations=7) == SlimConfig(iterations=7)
    assert slim(ranker="lightgbm", slim_iterations=0) is None
    assert slim() is None  # features of the re-ranker only: no ranker, no SLIM
