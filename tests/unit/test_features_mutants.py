"""The re-ranker's user side features at their bounds (the ages and genders a request may send)
and the user and item columns it reads from them, against values worked out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from models.neural.network import Architecture, init_params, logits
from models.ranking.features import (
    Retrieval,
    _category_code,
    _item_columns,
    _standardized,
    _top,
    _user_columns,
    candidate_features,
    check_user_features,
)
from models.ranking.knn import cooccurrence, cosine_neighbours
from models.recommenders import RequestError


def _requests(column: str, value: object) -> pd.DataFrame:
    return pd.DataFrame({"user_id": ["u0", "u1"], "history_items": [[], []],
                         column: ["30" if column == "age" else "M", value]})  # fmt: skip


@pytest.mark.parametrize("age", [0, "0", 0.5, "150", 150, 150.0, " 42 ", None, float("nan"), " "])
def test_an_age_from_0_to_150_years_or_an_empty_cell_is_allowed(age):
    check_user_features(_requests("age", age))


@pytest.mark.parametrize("age", [-1, "-0.5", 150.5, "151", "inf", "forty"])
def test_an_age_outside_0_to_150_years_is_refused_naming_row_user_and_value(age):
    with pytest.raises(RequestError, match=r"^request row 1 \(user 'u1'\): age .* is not a valid"):
        check_user_features(_requests("age", age))


@pytest.mark.parametrize("gender", ["M", "f", " F ", None, ""])
def test_m_or_f_in_either_case_or_an_empty_cell_is_a_gender(gender):
    check_user_features(_requests("gender", gender))


def test_another_gender_is_refused_naming_row_user_and_value():
    with pytest.raises(RequestError, match=r"^request row 1 \(user 'u1'\): gender 'X'"):
        check_user_features(_requests("gender", "X"))


def test_user_columns_read_age_gender_and_occupation_and_leave_unknowns_missing():
    users = pd.DataFrame({"age": ["25", None, "56"], "gender": ["m", "F", None],
                          "occupation": [7, None, "artist"]})  # fmt: skip
    columns = _user_columns(users, 3)
    np.testing.assert_array_equal(columns["user_age"], [25.0, np.nan, 56.0])
    np.testing.assert_array_equal(columns["user_gender"], [0.0, 1.0, np.nan])
    occupation = columns["user_occupation"]
    assert occupation[0] == 7.0 and np.isnan(occupation[1])
    assert occupation[2] == _category_code("artist") and 0 <= occupation[2] < 1000
    assert np.isnan(_category_code(None)) and np.isnan(_category_code(float("nan")))


def test_genre_affinity_is_the_share_of_the_history_in_the_items_genres_averaged():
    # 4 items; genres: item 0 in a, item 1 in a and b, item 2 in b, item 3 in none
    genres = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=float)
    catalogue = pd.DataFrame({"genre_a": genres[:, 0], "genre_b": genres[:, 1],
                              "year": [1990, 2001, 1975, 1960]})  # fmt: skip
    # ratings, not ones: only which items a history holds may count
    hist = sparse.csr_matrix(np.array([[5.0, 0, 4.0, 0], [0, 0, 0, 2.0], [3.0, 0, 0, 0]]))
    rows = np.array([0, 0, 0, 1, 1, 2, 2])
    items = np.array([1, 3, 0, 2, 0, 2, 1])
    affinity, year = _item_columns(SimpleNamespace(item_features=catalogue), hist, rows, items)
    expected = []
    for user, item in zip(rows, items, strict=True):
        history = np.flatnonzero(hist[user].toarray()[0])
        item_genres = np.flatnonzero(genres[item])
        shares = [genres[history, g].sum() / len(history) for g in item_genres]
        expected.append(np.mean(shares) if shares else np.nan)
    np.testing.assert_allclose(affinity, expected)
    assert np.isnan(affinity[1])  # item 3 has no genre
    np.testing.assert_array_equal(year, catalogue["year"].to_numpy(float)[items])


def test_scores_are_standardised_over_each_users_unseen_items_and_gaps_below_the_best():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(3, 6))
    scores[0, [1, 4]] = -np.inf  # seen items: not scored
    scores[2, 1:] = -np.inf  # a user with a single unseen item
    rows = np.array([0, 0, 1, 2])
    items = np.array([0, 5, 3, 0])
    z, gap = _standardized(scores, rows, items)
    for pair, (user, item) in enumerate(zip(rows, items, strict=True)):
        unseen = scores[user][np.isfinite(scores[user])]
        std = unseen.std()  # over the unseen items, ddof 0
        value = scores[user, item]
        if std == 0:  # one unseen item: it is its user's mean and best
            assert z[pair] == 0 and gap[pair] == 0
        else:
            assert z[pair] == pytest.approx((value - unseen.mean()) / std)
            assert gap[pair] == pytest.approx((unseen.max() - value) / std)


def _retrieval(n_candidates: int = 3) -> tuple[Retrieval, sparse.csr_matrix]:
    rng = np.random.default_rng(5)
    history = sparse.csr_matrix((rng.random((8, 7)) < 0.4).astype(float))
    similarity = cosine_neighbours(cooccurrence(history), neighbours=3)
    popularity = np.asarray(history.sum(axis=0)).ravel()
    factors = rng.normal(size=(7, 3))
    return Retrieval(factors, 0.5, 2.0, similarity, popularity, None, n_candidates), history


def test_als_ranks_and_gaps_count_only_the_unseen_items():
    retrieval, history = _retrieval()
    users = np.flatnonzero(np.diff(history.indptr) > 0)
    candidates = candidate_features(retrieval, history, history, users=users)
    scores = retrieval.als_scores(history[users])
    seen = history[users].toarray() > 0
    for pair, (user, item) in enumerate(zip(candidates.users, candidates.items, strict=True)):
        n = int(np.searchsorted(users, user))
        assert not seen[n, item]
        unseen = scores[n][~seen[n]]
        value = scores[n, item]
        row = candidates.features.iloc[pair]
        assert row["als_rank"] == 1 + np.sum(unseen > value)
        assert row["als_gap"] == pytest.approx((unseen.max() - value) / unseen.std())


def test_only_the_asked_unseen_pairs_are_scored_when_pairs_are_asked():
    retrieval, history = _retrieval()
    users = np.flatnonzero(np.diff(history.indptr) > 0)
    asked = sparse.csr_matrix(np.ones(history.shape) * (np.arange(7) % 3 == 0))
    candidates = candidate_features(retrieval, history, history, users=users, asked=asked)
    expected = {(u, i) for u in users for i in (0, 3, 6) if history[u, i] == 0}
    assert set(zip(candidates.users.tolist(), candidates.items.tolist(), strict=True)) == expected


def test_a_user_without_history_has_no_similar_item_to_name():
    retrieval, history = _retrieval(n_candidates=2)
    empty = sparse.vstack([history, sparse.csr_matrix((1, 7))]).tocsr()
    user = empty.shape[0] - 1
    candidates = candidate_features(retrieval, empty, empty, users=np.array([user]))
    assert len(candidates) > 0
    assert (candidates.neighbour == -1).all()
    assert (candidates.features["knn_max_similarity"] == 0).all()


def test_each_pairs_neighbour_is_its_most_similar_history_item_or_none_at_similarity_0():
    retrieval, full = _retrieval(n_candidates=7)
    history = sparse.vstack([full[:3], sparse.csr_matrix((1, 7)), full[3:]]).tocsr()
    candidates = candidate_features(retrieval, history, history)
    # by default every user with a history, and only those (row 3 has none)
    assert set(candidates.users) == set(np.flatnonzero(history.getnnz(axis=1)))
    assert 3 not in set(candidates.users)
    dense = retrieval.similarity.toarray()
    zero = 0
    for pair, (user, item) in enumerate(zip(candidates.users, candidates.items, strict=True)):
        sources = np.flatnonzero(history[user].toarray()[0])
        similarities = dense[sources, item]
        best = similarities.max()
        assert candidates.features["knn_max_similarity"].iloc[pair] == pytest.approx(best)
        if best > 0:
            assert dense[candidates.neighbour[pair], item] == pytest.approx(best)
            assert candidates.neighbour[pair] in sources
        else:
            zero += 1
            assert candidates.neighbour[pair] == -1
    assert zero > 0  # the case is reached


def test_without_neighbours_no_pair_names_a_similar_item():
    retrieval, history = _retrieval()
    without = Retrieval(retrieval.item_factors, 0.5, 2.0, None, retrieval.popularity, None, 3)
    candidates = candidate_features(without, history, history)
    assert len(candidates) > 0 and (candidates.neighbour == -1).all()
    assert candidates.features["knn_score"].isna().all()


def test_the_top_n_of_each_row_is_its_n_best_items_beyond_a_small_catalogue():
    # numpy sorts small rows whole inside argpartition: only a long row shows a wrong kth
    scores = np.random.default_rng(8).normal(size=(4, 400))
    for n in (1, 5, 40):
        top = _top(scores, n)
        for row in range(scores.shape[0]):
            assert set(top[row]) == set(np.argsort(-scores[row])[:n])


def _network_retrieval(n_users: int, n_items: int, density: float, seed: int):
    """A retrieval holding only a linear network, a binary history for it, and its params."""
    rng = np.random.default_rng(seed)
    history = sparse.random(n_users, n_items, density=density, random_state=rng, format="csr")
    history.data[:] = 1.0
    arch = Architecture(n_items=n_items, kind="dae", hidden=(), latent=4)
    params = init_params(arch, rng, dtype=np.float64)
    retrieval = Retrieval(np.zeros((n_items, 2)), 0.5, 2.0, None, np.ones(n_items), None, 3,
                          network=(params, arch))  # fmt: skip
    return retrieval, history, params, arch


def test_network_scores_are_its_logits_for_every_row():
    # 1100 users: two chunks of at most 1000; 1100 x 4000 float64 is past glibc's largest mmap
    # threshold (32 MB), so the output is fresh zeroed memory and a row left unwritten shows
    retrieval, history, params, arch = _network_retrieval(1100, 4000, 0.002, seed=1)
    scores = retrieval.nn_scores(history)
    expected = logits(params, arch, history)
    assert not (expected == 0).all(axis=1).any()
    np.testing.assert_allclose(scores, expected)


def test_every_user_is_scored_by_the_network_when_users_outnumber_items():
    # 1100 users, 300 items: the chunks must run over the users, not the items
    retrieval, history, params, arch = _network_retrieval(1100, 300, 0.02, seed=2)
    stale = np.full(history.shape, np.nan)  # memory an unwritten row could show
    del stale
    np.testing.assert_allclose(retrieval.nn_scores(history), logits(params, arch, history))
