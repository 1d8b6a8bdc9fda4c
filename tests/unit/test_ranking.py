"""Item-kNN, the federated LightGBM re-ranker and the two-stage recommender, against
centralized oracles."""

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.mf.als import RatingRows
from models.mf.implicit import CentralizedImplicitALS
from models.ranking.boosting import (
    RankerConfig,
    TreeEnsemble,
    boost_client,
    round_weights,
    train_centralized,
)
from models.ranking.features import (
    FEATURES,
    USER_FEATURE_VALUES,
    Retrieval,
    candidate_features,
)
from models.ranking.federated import (
    RankingConfig,
    knn_client_update,
    knn_server_update,
    ranker_server_update,
    run_two_stage,
)
from models.ranking.knn import cooccurrence, cosine_neighbours, knn_scores, strongest_neighbour
from models.ranking.recommender import RankingRecommender
from models.recommenders import RequestError
from tests.unit.helpers import without_met


@pytest.fixture(scope="module")
def implicit_clients():
    data = generate_synthetic(
        n_users=300, n_items=120, n_interactions=9000, seed=4, side_features=True
    )
    data = type(data)(
        data.frame.assign(rating=1.0), data.user_ids, data.item_ids,
        user_features=data.user_features, item_features=data.item_features,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    owner = assign_clients(data, n_clients=4, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.15, test_fraction=0.15)
    return data, build_clients(data, owner, split)


def _train_matrix(data, clients):
    """Everyone's training rows in one users x items matrix (the centralized view)."""
    parts = []
    for c in clients:
        m = c.matrix("train").tocoo()
        parts.append((np.searchsorted(data.user_ids, c.user_ids[m.row]), m.col))
    rows = np.concatenate([p[0] for p in parts])
    cols = np.concatenate([p[1] for p in parts])
    return sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(data.n_users, data.n_items))


def test_summed_client_cooccurrences_equal_the_centralized_gram(implicit_clients):
    data, clients = implicit_clients
    x = _train_matrix(data, clients).toarray()
    central = x.T @ x  # the oracle, in float64

    similarity, popularity = knn_server_update(
        [knn_client_update(c) for c in clients],
        data.n_items,
        RankingConfig(neighbours=500, shrink=0.0),
    )

    np.testing.assert_allclose(popularity, np.diag(central))
    norms = np.sqrt(np.diag(central))
    expected = central / np.outer(norms, norms)
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(similarity.toarray(), expected, atol=1e-12)


def _dense_neighbours(x: np.ndarray, neighbours: int, shrink: float) -> np.ndarray:
    """Item-kNN written out densely: shrunk cosine of the co-occurrences, column ``i`` keeping
    item ``i``'s ``neighbours`` most similar co-occurring items (ties: the lower index)."""
    counts = x.T @ x
    norms = np.sqrt(np.diag(counts))
    cosine = counts / (np.outer(norms, norms) + shrink)
    kept = np.zeros_like(cosine)
    for i in range(counts.shape[0]):
        others = [j for j in range(counts.shape[0]) if j != i and counts[j, i] > 0]
        for j in sorted(others, key=lambda j: (-cosine[j, i], j))[:neighbours]:
            kept[j, i] = cosine[j, i]
    return kept


@pytest.mark.parametrize(("neighbours", "shrink"), [(2, 2.0), (3, 10.0), (50, 10.0)])
def test_neighbours_and_scores_equal_the_dense_formula(neighbours, shrink):
    x = (np.random.default_rng(5).random((30, 9)) < 0.4).astype(float)
    expected = _dense_neighbours(x, neighbours, shrink)

    similarity = cosine_neighbours(
        cooccurrence(sparse.csr_matrix(x)), neighbours=neighbours, shrink=shrink
    )

    # float32 co-occurrence counts: equal to the float64 formula to float32 precision
    np.testing.assert_allclose(similarity.toarray(), expected, rtol=1e-6, atol=0)
    history = sparse.csr_matrix(x[:6])  # a user's score of i sums over i's neighbours it has
    np.testing.assert_allclose(knn_scores(history, similarity), x[:6] @ expected, rtol=1e-6)


def test_tied_neighbours_keep_the_lower_item_index():
    x = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=float)  # 1, 2, 3 tie for 0
    similarity = cosine_neighbours(cooccurrence(sparse.csr_matrix(x)), neighbours=1).toarray()
    assert np.flatnonzero(similarity[:, 0]).tolist() == [1]


def _strongest_neighbour_oracle(x, s, users, items):
    """Brute force over the dense matrices: among u's history items j that have item i as a
    neighbour (s[j, i] != 0), the one with the largest s[j, i] (lowest j on a tie); -1 and 0 if none."""
    best_item = np.full(len(users), -1)
    best_sim = np.zeros(len(users))
    for n, (u, i) in enumerate(zip(users, items, strict=True)):
        candidates = [j for j in range(x.shape[1]) if x[u, j] != 0 and s[j, i] != 0]
        if candidates:
            j = max(candidates, key=lambda j: (s[j, i], -j))
            best_item[n], best_sim[n] = j, s[j, i]
    return best_item, best_sim


def test_strongest_neighbour_matches_a_brute_force_search():
    rng = np.random.default_rng(11)
    n_users, n_items = 12, 10
    x = (rng.random((n_users, n_items)) < 0.35).astype(float)
    x[3] = 0.0  # a user with no history
    # any sparse similarity will do (distinct continuous values: no ties), zero diagonal, with
    # column i holding item i's neighbours j (stored entries)
    s = np.where(rng.random((n_items, n_items)) < 0.45, rng.random((n_items, n_items)) + 0.01, 0.0)
    np.fill_diagonal(s, 0.0)
    s[:, 5] = 0.0  # an item with no neighbours at all
    users, items = (a.ravel() for a in np.meshgrid(np.arange(n_users), np.arange(n_items)))

    got_item, got_sim = strongest_neighbour(
        sparse.csr_matrix(x), sparse.csr_matrix(s), users, items
    )
    want_item, want_sim = _strongest_neighbour_oracle(x, s, users, items)

    assert (want_item == -1).any() and (want_item >= 0).any()  # both outcomes are exercised
    np.testing.assert_array_equal(got_item, want_item)
    np.testing.assert_array_equal(got_sim, want_sim)


def test_neighbours_keep_the_most_similar_items_per_item():
    counts = sparse.csr_matrix(
        np.array([[4, 3, 1, 2], [3, 3, 0, 1], [1, 0, 1, 0], [2, 1, 0, 2]], dtype=float)
    )
    top1 = cosine_neighbours(counts, neighbours=1).toarray().T  # row j: item j's neighbours
    full = cosine_neighbours(counts, neighbours=3).toarray().T

    assert (top1 > 0).sum(axis=1).tolist() == [1, 1, 1, 1]
    for j in range(4):
        assert top1[j].argmax() == full[j].argmax()
        assert full[j, j] == 0.0
    np.testing.assert_allclose(full[0, 1], 3 / np.sqrt(4 * 3))


def test_knn_recommends_the_withheld_diagonal_of_a_checkerboard():
    # Two blocks of users and items; each user saw every item of its block but one.
    n = 8
    block = np.zeros((n, n))
    block[: n // 2, : n // 2] = 1
    block[n // 2 :, n // 2 :] = 1
    history = block.copy()
    np.fill_diagonal(history, 0)
    matrix = sparse.csr_matrix(history)
    similarity = cosine_neighbours(cooccurrence(matrix), neighbours=n)

    scores = np.where(history > 0, -np.inf, knn_scores(matrix, similarity))

    np.testing.assert_array_equal(scores.argmax(axis=1), np.arange(n))


def test_federated_two_stage_retrieval_equals_centralized_implicit_als(implicit_clients):
    data, clients = implicit_clients
    config = RankingConfig(n_factors=6, reg=0.5, alpha=3.0, init_std=0.1, ranker=None)

    result = run_two_stage(clients, data.n_items, config, rounds=4, seed=2)

    train = _train_matrix(data, clients).tocoo()
    central = CentralizedImplicitALS(6, reg=0.5, alpha=3.0, n_iter=4, init_std=0.1, seed=2).fit(
        RatingRows(
            train.row, train.col, np.ones(train.nnz), n_users=data.n_users, n_items=data.n_items
        )
    )
    np.testing.assert_allclose(
        result.recommender.retrieval.item_factors, central.item_params_.factors, atol=1e-8
    )


def test_server_adds_client_trees_weighted_by_their_query_groups():
    rng = np.random.default_rng(0)
    features = pd.DataFrame(rng.normal(size=(200, len(FEATURES))), columns=list(FEATURES))
    features[["user_gender", "user_occupation"]] = rng.integers(0, 3, (200, 2))
    labels = (features["als_score"] + 0.1 * rng.normal(size=200) > 0.5).astype(float).to_numpy()
    groups = np.full(20, 10)
    config = RankerConfig(trees_per_round=3, min_data_in_leaf=5)
    texts = [boost_client(features, labels, groups, np.zeros(200), config, seed) for seed in (1, 2)]

    def update(text, n_groups):
        from models.protocol import ClientUpdate

        return ClientUpdate(0, np.zeros(0, np.int64), np.zeros(0, np.int64),
                            {"trees": np.frombuffer(text.encode(), np.uint8)}, {"groups": n_groups})  # fmt: skip

    ensemble = ranker_server_update(
        TreeEnsemble(), [update(texts[0], 30.0), update(texts[1], 10.0)]
    )

    singles = [TreeEnsemble(((t, 1.0),)).predict(features) for t in texts]
    np.testing.assert_allclose(
        ensemble.predict(features), np.average(singles, axis=0, weights=[30, 10]) * 1.0, atol=1e-12
    )
    np.testing.assert_allclose(round_weights([30, 10]), [0.75, 0.25])
    # pred_contrib sums to the raw score, member by member
    np.testing.assert_allclose(
        ensemble.contributions(features).sum(axis=1), ensemble.predict(features), atol=1e-9
    )
    with pytest.raises(ValueError, match="no client had a query group"):
        round_weights([0, 0])


def test_reranker_lifts_retrieval_and_is_close_to_a_centralized_ranker(implicit_clients):
    data, clients = implicit_clients
    config = RankingConfig(
        n_factors=8, reg=1.0, alpha=5.0, n_candidates=30, neighbours=30,
        ranker=RankerConfig(rounds=4, trees_per_round=5, min_data_in_leaf=10),
    )  # fmt: skip
    result = run_two_stage(
        clients,
        data.n_items,
        config,
        rounds=5,
        item_features=data.item_features,
        eval_splits=("test",),
    )
    retrieval_ndcg = next(h for h in result.history if h["stage"] == "retrieval")["test/ndcg_at_10"]
    two_stage = result.history[-1]["test/ndcg_at_10"]
    assert two_stage > retrieval_ndcg

    # The same features and labels pooled in one place, one LightGBM ranker with as many trees.
    from models.metrics import add_sums, finalize_metrics
    from models.ranking.federated import evaluate_ranking, ranker_client_data

    base = RankingRecommender(result.recommender.retrieval, None, result.recommender.item_ids)
    parts = [ranker_client_data(c, base, ()) for c in clients]
    offset = np.cumsum([0] + [c.n_users for c in clients])
    users = np.concatenate([p.train.users + o for p, o in zip(parts, offset, strict=False)])
    features = pd.concat([p.train.features for p in parts], ignore_index=True)
    labels = np.concatenate([p.labels for p in parts])
    _, groups = np.unique(users, return_counts=True)
    central = RankingRecommender(
        result.recommender.retrieval,
        train_centralized(features, labels, groups, config.ranker),
        base.item_ids,
    )
    sums = add_sums(evaluate_ranking(c, central, ("test",), 10)["test"][0] for c in clients)
    central_ndcg = finalize_metrics(sums, k=10)["ndcg_at_10"]
    assert central_ndcg > retrieval_ndcg
    assert abs(two_stage - central_ndcg) < 0.05 * central_ndcg


def test_a_client_without_validation_rows_adds_no_query_group_and_the_others_train(
    implicit_clients,
):
    """A client whose users hold no validation row (a small site, say) has nothing to label:
    it contributes no query group, and the re-ranker learns from the other clients."""
    from models.ranking.federated import ranker_client_data

    data, _ = implicit_clients
    owner = assign_clients(data, n_clients=4, strategy="iid", rng=np.random.default_rng(0))
    split = split_rows(data, method="random", valid_fraction=0.15, test_fraction=0.15)
    split[(owner[data.frame["user"].to_numpy()] == 0) & (split == 1)] = 0
    clients = build_clients(data, owner, split)
    assert clients[0].matrix("valid").nnz == 0 and clients[1].matrix("valid").nnz > 0
    config = RankingConfig(n_factors=4, n_candidates=20, neighbours=20,
                           ranker=RankerConfig(rounds=2, trees_per_round=3, min_data_in_leaf=10))  # fmt: skip

    model = run_two_stage(clients, data.n_items, config, rounds=2, eval_splits=()).recommender

    empty = ranker_client_data(clients[0], replace(model, ranker=None), ())
    assert len(empty.train.users) == 0 and empty.labels.size == 0
    assert model.ranker is not None and len(model.ranker) == 2 * 3  # 2 rounds of 3 clients


def test_the_re_ranker_never_learns_from_the_selection_users(implicit_clients):
    """A fixed fifth of the users, by a hash of their id, are selection users: their validation
    rows are the ``select`` split and never a label of the re-ranker, whose valid/ metrics would
    otherwise flatter it in the comparison that promotes it."""
    from models.client import SELECT, selection_users
    from models.ranking.family import TwoStage
    from models.ranking.federated import evaluate_ranking, ranker_client_data

    data, clients = implicit_clients
    every = selection_users(data.user_ids)
    assert 0.1 < every.mean() < 0.3
    assert (selection_users(np.array([str(u) for u in data.user_ids], dtype=object)) == every).all()
    # pinned: a champion's re-ranker left out the same users in whatever version trained it
    chosen = np.flatnonzero(selection_users(np.arange(1, 61))) + 1
    assert chosen.tolist() == [5, 6, 11, 17, 19, 28, 29, 38, 42, 47, 54, 60]
    config = RankingConfig(n_factors=4, n_candidates=20, neighbours=20,
                           ranker=RankerConfig(rounds=1, trees_per_round=3, min_data_in_leaf=10))  # fmt: skip
    assert TwoStage(config).eval_splits == ("valid", SELECT, "test")
    assert TwoStage(replace(config, ranker=None)).eval_splits == ("valid", "test")
    model = run_two_stage(clients, data.n_items, config, rounds=1, eval_splits=()).recommender
    base = replace(model, ranker=None)
    labelled = 0
    for client in clients:
        # the same users whichever client holds them: a function of the id alone
        chosen = set(client.user_ids[client.selected])
        assert chosen == {u for u, s in zip(data.user_ids, every, strict=True) if s} & set(
            client.user_ids
        )
        valid, select = client.rows("valid"), client.rows(SELECT)
        mine = client.selected[valid.users]
        assert (select.users == valid.users[mine]).all() and (
            select.items == valid.items[mine]
        ).all()
        assert 0 < len(select) < len(valid)
        part = ranker_client_data(client, base, (SELECT,))
        assert not client.selected[part.train.users].any()  # no selection user is a query
        # ... and every other user with a validation item among the candidates is one
        hit = part.train.users[part.labels > 0]
        assert set(np.unique(hit)) == set(np.unique(part.train.users))
        assert set(part.splits[SELECT][1]) <= set(np.flatnonzero(client.selected))
        labelled += len(np.unique(part.train.users))
        every_user = ranker_client_data(client, base, (), leave_out_selection=False)
        assert client.selected[every_user.train.users].any()  # for studies that fold users
        # select's candidates and scores are valid's rows of the selection users: the same as
        # built for select alone
        both = ranker_client_data(client, base, ("valid", SELECT))
        (shared, held), (alone, alone_held) = both.splits[SELECT], part.splits[SELECT]
        assert (held == alone_held).all() and (shared.items == alone.items).all()
        pd.testing.assert_frame_equal(shared.features, alone.features)
        assert (both.labels == part.labels).all()
        pd.testing.assert_frame_equal(both.train.features, part.train.features)
        ranked = evaluate_ranking(client, model, ("valid", SELECT), 10)[SELECT]
        assert ranked[0] == evaluate_ranking(client, model, (SELECT,), 10)[SELECT][0]
    assert labelled > 0.5 * len(data.user_ids)


def test_recommender_saves_loads_and_explains(tmp_path, implicit_clients):
    data, clients = implicit_clients
    config = RankingConfig(n_factors=4, n_candidates=20, neighbours=20,
                           ranker=RankerConfig(rounds=2, trees_per_round=3, min_data_in_leaf=10))  # fmt: skip
    titles = np.array([f"Title {i}" for i in range(data.n_items)], dtype=object)
    model = run_two_stage(clients, data.n_items, config, rounds=2, item_ids=data.item_ids,
                          item_features=data.item_features, titles=titles, eval_splits=()).recommender  # fmt: skip
    model.save(tmp_path / "m")
    loaded = RankingRecommender.load(tmp_path / "m")
    history = [str(i) for i in data.item_ids[:15]]
    requests = pd.DataFrame({"user_id": ["u1", "new", "odd"],
                             "history_items": [history, [], ["no-such-item", history[0]]]})  # fmt: skip

    first = model.recommend(requests, k=5)
    second = loaded.recommend(requests, k=5)

    pd.testing.assert_frame_equal(first, second)
    assert list(first.columns) == ["user_id", "rank", "item_id", "score", "reason"]
    u1 = first[first.user_id == "u1"]
    assert u1["rank"].tolist() == [1, 2, 3, 4, 5]
    assert not set(u1.item_id) & set(history)  # never what the user already has
    assert u1["score"].is_monotonic_decreasing
    assert (u1["reason"].str.len() > 0).all()
    cold = first[first.user_id == "new"]
    assert (cold["reason"] == "no known items in history: most popular items").all()
    assert cold.item_id.tolist()[0] == str(data.item_ids[np.argmax(model.retrieval.popularity)])
    assert first[first.user_id == "odd"]["reason"].str.contains("ignored 1 unknown item").all()
    # a model trained on rows rated >= 3 reads a rated history the same way
    strict = replace(loaded, positive_threshold=3.0)
    strict.save(tmp_path / "strict")
    strict = RankingRecommender.load(tmp_path / "strict")
    assert strict.positive_threshold == 3.0
    rated = pd.DataFrame({"user_id": ["u1"], "history_items": [history],
                          "history_ratings": [[5.0, 1.0] * 7 + [4.0]]})  # fmt: skip
    kept = pd.DataFrame({"user_id": ["u1"], "history_items": [history[::2]]})  # the 5s and the 4
    # ... and recommends none of its items, the ones rated below the threshold included
    expected = without_met(model.recommend(kept, k=40 + len(history)), {"u1": set(history)}, 40)
    answer = strict.recommend(rated, k=40)
    columns = ["user_id", "rank", "item_id", "score"]  # a reason compares with the list it is in
    pd.testing.assert_frame_equal(answer[columns], expected[columns])
    assert set(model.recommend(kept, k=40).item_id) & set(history[1::2])  # which it used to
    low = strict.recommend(rated.assign(items=[[history[1]]]))
    assert low.reason.tolist() == ["in the history: not scored"]
    unrated = pd.DataFrame({"user_id": ["u1"], "history_items": [history]})
    pd.testing.assert_frame_equal(strict.recommend(unrated, k=5), first.iloc[:5])
    # no reason names a part the model lacks: it has no network, and no user has demographics
    deep = model.recommend(requests.iloc[:1], k=60)
    assert not deep.reason.isin(
        ["fits the pattern of your whole history", "popular with people like you"]
    ).any()
    # past the candidates a list goes on in implicit ALS's order, unscored: every unseen item
    whole = loaded.recommend(requests.iloc[:1], k=data.n_items)
    assert len(whole) == data.n_items - len(history) and whole.item_id.is_unique
    pd.testing.assert_frame_equal(whole.iloc[:5][columns], u1[columns])
    ranked, tail = whole[whole.score.notna()], whole[whole.score.isna()]
    assert ranked.score.is_monotonic_decreasing and len(ranked) < len(whole)
    assert tail.index.min() == len(ranked)
    assert (tail.reason == "beyond the 20 candidates of each retrieval model: ranked by implicit "
            "ALS, not scored").all()  # fmt: skip
    row = {str(item): i for i, item in enumerate(data.item_ids)}
    known = np.zeros((1, data.n_items))
    known[0, [row[item] for item in history]] = 1.0
    als = model.retrieval.als_scores(sparse.csr_matrix(known))[0]
    assert (np.diff(als[[row[item] for item in tail.item_id]]) <= 0).all()

    # asked items are scored as the top-K path scores them, and ranked best first: the
    # unscored ones last, in the order asked
    top = u1.item_id.tolist()
    outside = next(str(i) for i in data.item_ids if str(i) not in {*top, *history})
    wanted = [top[2], outside, "no-such-item", history[0], top[0]]
    asked = pd.DataFrame({"user_id": ["u1", "new"], "history_items": [history, []],
                          "items": [wanted, [top[0]]]})  # fmt: skip
    scored = loaded.recommend(asked)
    mine = scored[scored.user_id == "u1"].set_index("item_id")
    assert mine["rank"].tolist() == [1, 2, 3, 4, 5] and set(mine.index) == set(wanted)
    assert mine.index.tolist()[3:] == ["no-such-item", history[0]]
    assert np.all(np.diff(mine.score.iloc[:3].to_numpy()) <= 0)
    np.testing.assert_allclose(mine.score[[top[2], top[0]]], u1.score.iloc[[2, 0]], rtol=1e-12)
    assert mine.index[0] == top[0] or mine.index[0] == outside
    assert np.isfinite(mine.score[outside])  # outside the candidates, scored all the same
    assert mine.reason[top[0]] == "asked: scored by the re-ranker"
    alone = replace(loaded, ranker=None).recommend(asked)  # retrieval alone: its ALS score
    alone = alone[alone.user_id == "u1"].set_index("item_id")
    assert alone.reason[top[0]] == "asked: scored by implicit ALS"
    assert mine.reason.iloc[3:].tolist() == [
        "unknown item: not scored",
        "in the history: not scored",
    ]
    assert scored[scored.user_id == "new"].reason.tolist() == [
        "no known items in history: not scored"
    ]
    # an empty list asks for nothing; a row without one gets its top-K list
    mixed = asked.assign(user_id=["asks-none", "top-k"], history_items=[history, history],
                         items=[[], None])  # fmt: skip
    answer = loaded.recommend(mixed, k=3)
    assert answer.user_id.tolist() == ["top-k"] * 3
    # an age or gender the re-ranker cannot read is refused, not taken as unknown; a blank one
    # is unknown
    for column, value, shown in [("gender", "male", "'male'"), ("age", 999.0, "999.0"),
                                 ("age", "twenty", "'twenty'"), ("age", -1, "-1.0")]:  # fmt: skip
        with pytest.raises(
            RequestError,
            match=rf"^request row 0 \(user 'u1'\): {column} {shown} is not a valid {column}; "
            rf"allowed: {re.escape(USER_FEATURE_VALUES[column])}$",
        ):
            loaded.recommend(requests.assign(**{column: [value, None, None]}), k=3)
    blank = requests.assign(gender=["", None, " f "], age=[None, 30, float("nan")])
    assert len(loaded.recommend(blank, k=3)) == 9


def test_similar_item_reason_names_the_history_item():
    # Items 0 and 1 always go together: item 1's reason names item 0's title.
    history = sparse.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]], float))
    similarity = cosine_neighbours(cooccurrence(history), neighbours=2)
    retrieval = Retrieval(np.eye(3), 1.0, 1.0, similarity, np.array([3.0, 3.0, 2.0]), None, 2)
    titles = np.array(["Alpha", "Beta", "Gamma"], dtype=object)
    model = RankingRecommender(retrieval, None, np.array(["a", "b", "c"]), titles)
    user = sparse.csr_matrix([[1.0, 0, 0]])

    candidates = candidate_features(retrieval, user, user)
    answer = model.recommend(pd.DataFrame({"user_id": ["u"], "history_items": [["a"]]}), k=2)

    row = int(np.flatnonzero(candidates.items == 1)[0])
    assert candidates.neighbour[row] == 0
    assert candidates.features["knn_max_similarity"].iloc[row] == pytest.approx(1.0)
    assert answer.set_index("item_id").loc["b", "reason"] == "similar to Alpha, which you liked"


def test_ease_is_a_candidate_source_a_feature_and_saved_with_the_model(tmp_path, implicit_clients):
    import dataclasses

    from models.ranking.ease import ease_scores, federated_ease_weights
    from models.ranking.recommender import align_recommender

    data, clients = implicit_clients
    config = RankingConfig(n_factors=4, n_candidates=5, neighbours=20, ranker=None)
    base = run_two_stage(clients, data.n_items, config, rounds=2, eval_splits=()).recommender
    weights = federated_ease_weights(
        [knn_client_update(c).arrays for c in clients], data.n_items, reg=10.0
    )
    retrieval = dataclasses.replace(base.retrieval, ease=weights)
    model = RankingRecommender(retrieval, None, np.asarray(data.item_ids).astype(str))
    history = clients[0].matrix("train")
    users = np.flatnonzero(np.diff(history.indptr) > 0)

    candidates = candidate_features(retrieval, history, history, users=users)

    expected = np.where(history[users].toarray() > 0, -np.inf, ease_scores(history[users], weights))
    for n, u in enumerate(users):
        mine = candidates.items[candidates.users == u]
        top5 = np.argsort(-expected[n], kind="stable")[:5]
        assert set(top5) <= set(mine)  # EASE's top-N is among the candidates
    row = np.searchsorted(users, candidates.users)
    np.testing.assert_allclose(
        candidates.features["ease_score"].to_numpy(), expected[row, candidates.items]
    )
    assert candidates.features["ease_rank"].min() == 1.0
    without = candidate_features(base.retrieval, history, history, users=users)
    assert without.features["ease_score"].isna().all()

    model.save(tmp_path / "m")
    loaded = RankingRecommender.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.retrieval.ease, weights)
    reversed_ids = model.item_ids[::-1]
    aligned = align_recommender(model, reversed_ids)
    np.testing.assert_array_equal(aligned.retrieval.ease, weights[::-1, ::-1])


def test_without_a_re_ranker_a_model_with_ease_recommends_centralized_eases_top_k(
    tmp_path, implicit_clients
):
    """The oracle: EASE solved here on the pooled training matrix, ``B = I - P / diag(P)``."""
    import json

    data, clients = implicit_clients
    config = RankingConfig(n_factors=4, n_candidates=10, neighbours=20, ranker=None, ease_reg=50.0)
    model = run_two_stage(clients, data.n_items, config, rounds=2, eval_splits=()).recommender
    x = _train_matrix(data, clients).toarray()
    p = np.linalg.inv(x.T @ x + 50.0 * np.eye(data.n_items))
    b = np.eye(data.n_items) - p / np.diag(p)
    ids = np.asarray(data.item_ids).astype(str)
    users = [u for u in range(25) if x[u].sum() > 0]
    requests = pd.DataFrame({"user_id": [f"u{u}" for u in users],
                             "history_items": [list(ids[x[u] > 0]) for u in users]})  # fmt: skip

    answer = model.recommend(requests, k=5)

    assert model.base == "ease"
    for u in users:
        expected = np.where(x[u] > 0, -np.inf, x[u] @ b)
        mine = answer[answer.user_id == f"u{u}"]
        assert mine.item_id.tolist() == list(ids[np.argsort(-expected, kind="stable")[:5]]), u
        np.testing.assert_allclose(mine.score, np.sort(expected)[::-1][:5], rtol=1e-8)
    assert set(answer.reason) <= {
        "often chosen together with items you liked",
    } | {r for r in answer.reason if r.startswith("similar to ")}
    # a k past the candidates (EASE's, ALS's and kNN's top 10) lists every unseen item: the
    # candidates as ranked, then the rest in EASE's order, without a score
    whole = model.recommend(requests, k=data.n_items)
    for u in users:
        expected = np.where(x[u] > 0, -np.inf, x[u] @ b)
        mine = whole[whole.user_id == f"u{u}"]
        assert len(mine) == (x[u] == 0).sum() and mine.item_id.is_unique
        pd.testing.assert_frame_equal(mine.iloc[:5].reset_index(drop=True),
                                      answer[answer.user_id == f"u{u}"].reset_index(drop=True))  # fmt: skip
        assert mine.item_id.tolist()[:10] == list(ids[np.argsort(-expected, kind="stable")[:10]])
        tail = mine[mine.score.isna()]
        assert len(tail) > 0 and tail.index.min() > mine[mine.score.notna()].index.max()
        row = {item: i for i, item in enumerate(ids)}
        tail_scores = expected[[row[item] for item in tail.item_id]]
        assert (np.diff(tail_scores) <= 0).all(), u  # EASE's order
        assert (tail.reason == "beyond the 10 candidates of each retrieval model: ranked by "
                "EASE, not scored").all()  # fmt: skip
    asked = requests.iloc[:1].assign(items=[[answer.item_id.iloc[0]]])
    assert model.recommend(asked).reason.tolist() == ["asked: scored by EASE"]
    # kept with the model; one saved before the field existed ranks by implicit ALS, as it did
    model.save(tmp_path / "m")
    pd.testing.assert_frame_equal(RankingRecommender.load(tmp_path / "m").recommend(requests, k=5),
                                  answer)  # fmt: skip
    meta = json.loads((tmp_path / "m" / "recommender.json").read_text())
    del meta["base"]
    (tmp_path / "m" / "recommender.json").write_text(json.dumps(meta))
    older = RankingRecommender.load(tmp_path / "m")
    assert older.base == "als"
    pd.testing.assert_frame_equal(
        older.recommend(requests, k=5), replace(model, base="als").recommend(requests, k=5)
    )
    with pytest.raises(ValueError, match="base='ease' needs the retrieval's EASE weights"):
        replace(model, retrieval=replace(model.retrieval, ease=None))


def test_ranker_objective_is_checked_and_reaches_lightgbm():
    rng = np.random.default_rng(1)
    features = pd.DataFrame(rng.normal(size=(200, len(FEATURES))), columns=list(FEATURES))
    labels = (features["ease_score"] > 0.5).astype(float).to_numpy()
    config = RankerConfig(trees_per_round=3, min_data_in_leaf=5, objective="rank_xendcg")

    text = boost_client(features, labels, np.full(20, 10), np.zeros(200), config, seed=1)

    assert "objective=rank_xendcg" in text
    with pytest.raises(ValueError, match="objective='pointwise' must be one of"):
        RankerConfig(objective="pointwise")  # type: ignore[arg-type]


def test_network_is_a_candidate_source_features_and_saved_with_the_model(
    tmp_path, implicit_clients
):
    from models.neural.family import NeuralConfig
    from models.neural.federated import FederatedConfig
    from models.neural.recommender import NeuralRecommender
    from models.ranking.family import TwoStage
    from models.ranking.recommender import align_recommender

    data, clients = implicit_clients
    neural = NeuralConfig(kind="dae", hidden=(), latent=8, federated=FederatedConfig(rounds=2))
    config = RankingConfig(n_factors=4, n_candidates=5, neighbours=20, ranker=None, neural=neural)
    family = TwoStage(config)

    result = run_two_stage(clients, data.n_items, config, rounds=2, eval_splits=("valid",))

    stages = [e["stage"] for e in result.history]
    assert stages == ["als", "als", "neural", "neural", "retrieval"]
    params, arch = result.recommender.retrieval.network
    initial = family.initial_state(data.n_items, 0).network.params
    assert not np.allclose(params["enc0_w"], initial["enc0_w"])  # FedAvg moved it
    history = clients[0].matrix("train")
    users = np.flatnonzero(np.diff(history.indptr) > 0)
    candidates = candidate_features(result.recommender.retrieval, history, history, users=users)
    # the neural family's own recommender over the same network: a softmax, same order as logits
    probs = NeuralRecommender(params, arch, np.arange(data.n_items).astype(str),
                              np.zeros(data.n_items)).score(history[users])  # fmt: skip
    probs[history[users].toarray() > 0] = -np.inf
    row = np.searchsorted(users, candidates.users)
    for n, u in enumerate(users):
        mine = candidates.items[candidates.users == u]
        assert set(np.argsort(-probs[n], kind="stable")[:5]) <= set(mine)
    expected_rank = (probs[row] > probs[row, candidates.items][:, None]).sum(axis=1) + 1
    np.testing.assert_array_equal(candidates.features["nn_rank"].to_numpy(), expected_rank)
    # z: standardised over the user's unseen items, gap: below the user's best, same units (the
    # log-probabilities differ from the logits by a constant per user)
    first = candidates.users == users[0]
    log_probs = np.log(probs[0][np.isfinite(probs[0])])
    mine = np.log(probs[0][candidates.items[first]])
    np.testing.assert_allclose(
        candidates.features["nn_z"].to_numpy()[first],
        (mine - log_probs.mean()) / log_probs.std(), rtol=1e-4,
    )  # fmt: skip
    np.testing.assert_allclose(
        candidates.features["nn_gap"].to_numpy()[first],
        (log_probs.max() - mine) / log_probs.std(), rtol=1e-4,
    )  # fmt: skip

    model = RankingRecommender(result.recommender.retrieval, None, result.recommender.item_ids)
    model.save(tmp_path / "m")
    loaded = RankingRecommender.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.retrieval.network[0]["enc0_w"], params["enc0_w"])
    aligned = align_recommender(model, model.item_ids[::-1])
    mirrored = sparse.csr_matrix(history[users].toarray()[:, ::-1])
    np.testing.assert_allclose(
        aligned.retrieval.nn_scores(mirrored),
        model.retrieval.nn_scores(history[users])[:, ::-1], rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    state = family.load_state(family.state_arrays(family.initial_state(data.n_items, 0)))
    np.testing.assert_array_equal(state.network.params["enc0_w"], initial["enc0_w"])


def test_network_rounds_flag_builds_the_network_phase_and_needs_the_reranker():
    from fedrec.config import TrainingConfig
    from models.ranking.family import NEURAL, TwoStage

    config = TrainingConfig(
        feedback="implicit", ranker="lightgbm", ranker_network_rounds=3, neural_lr=0.01
    )

    ranking = config.ranking_config()

    assert ranking.neural.federated.rounds == 3 and ranking.neural.train.learning_rate == 0.01
    phases = [(p.name, p.rounds) for p in TwoStage(ranking).phases(2)]
    assert phases == [("als", 2), ("knn", 1), (NEURAL, 3), ("ranker", ranking.ranker.rounds)]
    assert TrainingConfig(feedback="implicit", ranker="lightgbm").ranking_config().neural is None
    with pytest.raises(
        ValueError, match="ranker_network_rounds=3: the network feeds the re-ranker"
    ):
        TrainingConfig(feedback="implicit", ranker="none", ranker_network_rounds=3)


def test_a_ranker_saved_with_an_earlier_versions_shorter_feature_list_still_scores(tmp_path):
    """A champion saved before features were added (here: without the slim_* columns) loads and
    scores from the columns it was fitted on; a name this version does not know is refused."""
    import json

    import lightgbm as lgb

    rng = np.random.default_rng(0)
    earlier = [name for name in FEATURES if not name.startswith("slim_")]
    assert len(earlier) < len(FEATURES)  # the list did grow
    frame = pd.DataFrame(rng.normal(size=(200, len(FEATURES))), columns=list(FEATURES))
    booster = lgb.train(
        {"objective": "regression", "verbosity": -1, "num_leaves": 4},
        lgb.Dataset(frame[earlier].to_numpy(), label=rng.normal(size=200)),
        num_boost_round=5,
    )
    TreeEnsemble(((booster.model_to_string(), 0.5),), tuple(earlier)).save(tmp_path / "r.json")

    loaded = TreeEnsemble.load(tmp_path / "r.json")
    assert loaded.features == tuple(earlier)
    expected = 0.5 * booster.predict(frame[earlier].to_numpy(), raw_score=True)
    np.testing.assert_allclose(loaded.predict(frame), expected)
    assert loaded.contributions(frame).shape == (200, len(earlier) + 1)
    with pytest.raises(ValueError, match="cannot be extended"):
        loaded.extend([booster.model_to_string()], [1.0])

    raw = json.loads((tmp_path / "r.json").read_text())
    raw["features"].append("no_such_feature")
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="no_such_feature"):
        TreeEnsemble.load(tmp_path / "bad.json")
