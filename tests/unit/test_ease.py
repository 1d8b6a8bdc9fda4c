"""EASE: the closed form against column-wise ridge regressions, federated against centralized."""

import numpy as np
import pytest
from scipy import sparse

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.ranking.ease import EASE, ease_weights, federated_ease_weights
from models.ranking.federated import knn_client_update
from tests.unit.helpers import pooled_train_matrix


def _ridge_oracle(x: np.ndarray, reg: float) -> np.ndarray:
    """EASE with diag(B) = 0 is, column by column, a ridge regression of item j on the others."""
    n = x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        others = np.delete(np.arange(n), j)
        a = x[:, others]
        b[others, j] = np.linalg.solve(a.T @ a + reg * np.eye(n - 1), a.T @ x[:, j])
    return b


@pytest.fixture(scope="module")
def clients():
    data = generate_synthetic(n_users=200, n_items=60, n_interactions=3000, seed=7)
    rng = np.random.default_rng(1)
    owner = assign_clients(data, n_clients=5, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    return data, build_clients(data, owner, split)


def test_closed_form_equals_columnwise_ridge_regressions():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 12)) < 0.3).astype(float)

    weights = ease_weights(x.T @ x, reg=3.0)

    np.testing.assert_allclose(weights, _ridge_oracle(x, 3.0), atol=1e-10)
    assert np.all(np.diag(weights) == 0.0)


def test_federated_ease_from_client_cooccurrences_equals_centralized(clients):
    data, parts = clients
    central = EASE(reg=20.0).fit(pooled_train_matrix(data, parts))

    updates = [knn_client_update(c) for c in parts]  # the same statistic item-kNN sends
    federated = federated_ease_weights([u.arrays for u in updates], data.n_items, reg=20.0)

    np.testing.assert_allclose(federated, central.weights_, rtol=0, atol=1e-8)
    x = pooled_train_matrix(data, parts).toarray()
    np.testing.assert_allclose(central.weights_, _ridge_oracle(x, 20.0), atol=1e-8)


def test_ease_recommends_the_withheld_diagonal_of_a_checkerboard():
    n = 8
    block = np.zeros((n, n))
    block[: n // 2, : n // 2] = 1
    block[n // 2 :, n // 2 :] = 1
    history = block.copy()
    np.fill_diagonal(history, 0)

    items, scores = EASE(reg=1.0).fit(sparse.csr_matrix(history)).recommend(history, k=1)

    np.testing.assert_array_equal(items[:, 0], np.arange(n))
    assert np.all(np.isfinite(scores))


def test_an_item_nobody_touched_has_no_weights_and_is_never_recommended():
    history = sparse.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]], float))
    model = EASE(reg=0.5).fit(history)

    assert np.all(np.isfinite(model.weights_))
    assert not model.weights_[3].any() and not model.weights_[:, 3].any()
    np.testing.assert_array_equal(model.known_, [True, True, True, False])
    # user 0 has items 0, 1: item 2 is the only eligible one, item 3 (untouched) never appears
    items, scores = model.recommend(history[:1], k=3)
    assert items[0].tolist() == [2, -1, -1]
    assert np.isneginf(scores[0, 1:]).all()


@pytest.mark.parametrize("reg", [0, -1.0, float("nan"), float("inf"), "lots", None])
def test_reg_must_be_a_finite_positive_number(reg):
    with pytest.raises(ValueError, match=r"^EASE reg=.* must be a finite number > 0$"):
        EASE(reg=reg).fit(sparse.eye(3, format="csr"))


def test_fit_is_needed_and_shapes_are_checked():
    with pytest.raises(RuntimeError, match="not fitted"):
        EASE().score(sparse.eye(3, format="csr"))
    with pytest.raises(ValueError, match="square"):
        ease_weights(np.ones((2, 3)), reg=1.0)
    model = EASE(reg=1.0).fit(sparse.eye(3, format="csr"))
    with pytest.raises(ValueError, match="history has 2 items, the model 3"):
        model.score(sparse.eye(2, format="csr"))


def test_save_and_load_give_the_same_recommendations(tmp_path, clients):
    data, parts = clients
    history = pooled_train_matrix(data, parts)
    model = EASE(reg=10.0).fit(history)

    model.save(tmp_path / "ease.npz")
    loaded = EASE.load(tmp_path / "ease.npz")

    assert loaded.reg == 10.0
    np.testing.assert_array_equal(loaded.recommend(history, 5)[0], model.recommend(history, 5)[0])
    np.savez(tmp_path / "other.npz", weights=np.eye(2))
    with pytest.raises(ValueError, match="not an EASE model"):
        EASE.load(tmp_path / "other.npz")


def test_an_item_one_user_touched_is_known_and_can_be_recommended():
    """``known_`` is every item with at least one training interaction, however few."""
    history = sparse.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]], float))
    model = EASE(reg=0.5).fit(history)

    np.testing.assert_array_equal(model.known_, np.asarray(history.sum(axis=0)).ravel() > 0)
    items, _ = model.recommend(history[:1], k=2)
    assert sorted(items[0].tolist()) == [2, 3]  # user 0's two unseen items, both seen once


@pytest.mark.parametrize("k", [1, 2, 5, 300])
def test_recommend_returns_the_top_k_of_a_full_sort_of_the_scores(k):
    """Against sorting every eligible item's score ``X_u B`` (the history's and never-seen
    items excluded), for several k, over enough items that a partial sort is not a full one."""
    rng = np.random.default_rng(11)
    x = (rng.random((20, 300)) < 0.05).astype(float)
    x[:, 299] = 0.0  # an item nobody touched
    model = EASE(reg=2.0).fit(sparse.csr_matrix(x))
    scores = x @ ease_weights(x.T @ x, reg=2.0)

    items, values = model.recommend(sparse.csr_matrix(x), k=k)

    assert items.shape == values.shape == (20, k)
    for u in range(20):
        eligible = np.flatnonzero((x[u] == 0) & (x.sum(axis=0) > 0))
        best = np.sort(scores[u, eligible])[::-1][:k]  # the k best scores, ties in any order
        n = best.size
        np.testing.assert_allclose(values[u, :n], best, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(values[u, :n], scores[u, items[u, :n]], rtol=1e-8, atol=1e-12)
        assert set(items[u, :n]) <= set(eligible) and len(set(items[u, :n])) == n
        assert np.all(items[u, n:] == -1) and np.all(np.isneginf(values[u, n:]))
