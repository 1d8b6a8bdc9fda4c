"""What the served models answer at their edges, against oracles written here: the network's
"because you liked" item by leaving each history item out and scoring again, the MF reason's
closest liked item by cosines, the two-stage model's lists beyond its candidates and its cold
starts with items no client trained, ranks from 1 in every kind of list, and models re-indexed
to a new catalogue."""

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.mf.params import ItemParams
from models.mf.recommender import MFRecommender
from models.neural.network import Architecture, init_params, logits
from models.neural.recommender import NeuralRecommender
from models.ranking.boosting import RankerConfig
from models.ranking.federated import RankingConfig, run_two_stage
from models.ranking.recommender import _align_network, align_recommender


def test_the_networks_reason_is_the_history_item_whose_absence_lowers_the_item_most():
    arch = Architecture(n_items=25, kind="dae", hidden=(), latent=6)
    params = init_params(arch, np.random.default_rng(7), dtype=np.float64)
    ids = np.array([f"i{i}" for i in range(25)])
    model = NeuralRecommender(params, arch, ids, np.arange(25.0))
    rng = np.random.default_rng(8)
    histories = [sorted(rng.choice(25, 5, replace=False).tolist()) for _ in range(12)]
    requests = pd.DataFrame(
        {
            "user_id": [f"u{n}" for n in range(12)],
            "history_items": [[f"i{i}" for i in h] for h in histories],
        }
    )

    answer = model.recommend(requests, k=6)

    def probability(items, item):
        row = np.zeros((1, 25))
        row[0, items] = 1.0
        return model.score(row)[0, item]

    anchors = []
    for n, history in enumerate(histories):
        mine = answer[answer.user_id == f"u{n}"]
        assert len(mine) == 6 and not set(mine.item_id) & {f"i{i}" for i in history}
        for item_id, reason in zip(mine.item_id, mine.reason, strict=True):
            item = int(item_id[1:])
            full = np.log(probability(history, item))
            drops = [
                full - np.log(probability([h for h in history if h != j], item)) for j in history
            ]
            anchors.append(int(np.argmax(drops)))
            assert reason == f"because you liked i{history[anchors[-1]]}"
    assert set(anchors) == set(range(5))  # every position of a history was somebody's reason


def test_the_mf_reason_names_the_liked_history_item_whose_factors_point_closest():
    """Oracle: the cosine of every liked history item (rated at least the user's mean) with the
    recommended item, by hand; the reason names the largest."""
    rng = np.random.default_rng(10)
    factors = rng.normal(size=(30, 3))
    factors[4] = 0.0  # an item without direction is never the closest
    ids = np.array([f"i{i}" for i in range(30)])
    titles = np.array([f"T{i}" for i in range(30)], dtype=object)
    model = MFRecommender(ItemParams(factors, rng.normal(size=30), 3.5), ids, np.ones(30), 0.1,
                          (1.0, 5.0), titles=titles)  # fmt: skip
    history, ratings = [4, 2, 9, 13, 21, 27], [5.0, 5.0, 4.0, 1.0, 4.0, 2.0]
    requests = pd.DataFrame({"user_id": ["u"], "history_items": [[f"i{i}" for i in history]],
                             "history_ratings": [ratings]})  # fmt: skip

    answer = model.recommend(requests, k=8)

    liked = [h for h, r in zip(history, ratings, strict=True) if r >= np.mean(ratings)]
    assert liked == [4, 2, 9, 21]
    for item_id, reason in zip(answer.item_id, answer.reason, strict=True):
        item = int(item_id[1:])
        cosine = [
            factors[h]
            @ factors[item]
            / (np.linalg.norm(factors[h]) * np.linalg.norm(factors[item]))
            if factors[h].any()
            else -np.inf
            for h in liked
        ]
        near = liked[int(np.argmax(cosine))]
        rated = ratings[history.index(near)]
        assert reason.endswith(f"; closest to T{near} you rated {rated:g}"), reason


@pytest.fixture(scope="module")
def two_stage():
    data = generate_synthetic(n_users=200, n_items=90, n_interactions=5000, seed=8)
    data = type(data)(data.frame.assign(rating=1.0), data.user_ids, data.item_ids)
    owner = assign_clients(data, n_clients=3, strategy="iid", rng=np.random.default_rng(0))
    split = split_rows(data, method="random", valid_fraction=0.15, test_fraction=0.15)
    config = RankingConfig(n_factors=4, n_candidates=8, neighbours=10,
                           ranker=RankerConfig(rounds=1, trees_per_round=3, min_data_in_leaf=5))  # fmt: skip
    clients = build_clients(data, owner, split)
    result = run_two_stage(clients, data.n_items, config, rounds=2, item_ids=data.item_ids,
                           eval_splits=())  # fmt: skip
    return data, result.recommender


def test_a_long_list_goes_beyond_the_candidates_without_a_met_an_untrained_or_a_repeated_item(
    two_stage,
):
    data, model = two_stage
    ids = [str(i) for i in data.item_ids]
    trained = np.ones(data.n_items, dtype=bool)
    trained[::4] = False  # every fourth item: no client trained it
    model = replace(model, trained=trained)
    history = ids[1:30:3]
    requests = pd.DataFrame({"user_id": ["u"], "history_items": [history]})

    answer = model.recommend(requests, k=60)

    allowed = {ids[i] for i in range(data.n_items) if trained[i]} - set(history)
    assert len(answer) == 60 <= len(allowed)
    assert answer["rank"].tolist() == list(range(1, 61))
    assert set(answer.item_id) <= allowed and answer.item_id.is_unique
    beyond = answer[answer.score.isna()]  # not scored: past the candidates of every source
    assert len(beyond) > 0 and answer.score.iloc[: len(answer) - len(beyond)].notna().all()
    assert beyond.reason.str.startswith("beyond the 8 candidates").all()


def test_a_list_of_one_has_its_item_and_a_reason(two_stage):
    data, model = two_stage
    history = [str(i) for i in data.item_ids[:10]]
    answer = model.recommend(pd.DataFrame({"user_id": ["u"], "history_items": [history]}), k=1)
    assert len(answer) == 1 and answer.reason.iloc[0]
    longer = model.recommend(pd.DataFrame({"user_id": ["u"], "history_items": [history]}), k=5)
    assert answer.item_id.iloc[0] == longer.item_id.iloc[0]


def test_a_network_aligned_to_a_new_catalogue_scores_known_items_as_before_and_new_ones_last():
    for kind, hidden in (("dae", ()), ("vae", (7,))):
        arch = Architecture(n_items=12, kind=kind, hidden=hidden, latent=4)
        params = init_params(arch, np.random.default_rng(5), dtype=np.float64)
        last = f"dec{len(arch.decoder_dims) - 2}_w"
        params[last] = 20.0 * params[last]  # known items' logits far below the lowest bias
        # today's catalogue: old items 11, 0, 5, ..., and two items the network never saw
        source = np.array([11, 0, -1, 5, 3, 8, -1, 2])
        aligned, new_arch = _align_network(params, arch, source)
        assert new_arch.n_items == 8
        rng = np.random.default_rng(6)
        today = sparse.csr_matrix((rng.random((20, 8)) < 0.3) * (source >= 0))
        old = sparse.csr_matrix(
            (today.data, (today.nonzero()[0], source[today.nonzero()[1]])), shape=(20, 12)
        )
        before, after = logits(params, arch, old), logits(aligned, new_arch, today)
        known = np.flatnonzero(source >= 0)
        np.testing.assert_allclose(after[:, known], before[:, source[known]], rtol=1e-10)
        assert (after[:, source < 0].max(axis=1) < after[:, known].min(axis=1)).all(), kind


def test_every_list_ranks_from_1_cold_starts_and_asked_items_included():
    rng = np.random.default_rng(9)
    ids = np.array([f"i{i}" for i in range(6)])
    popularity = np.array([5.0, 50, 1, 7, 9, 3])
    mf = MFRecommender(
        ItemParams(rng.normal(size=(6, 2)), rng.normal(size=6), 3.5), ids, popularity, 0.1
    )
    arch = Architecture(n_items=6, kind="dae", hidden=(), latent=3)
    network = NeuralRecommender(init_params(arch, rng, dtype=np.float64), arch, ids, popularity)
    requests = pd.DataFrame(
        {
            "user_id": ["cold", "asks", "one"],
            "history_items": [[], ["i1", "i2"], ["i4"]],
            "items": [None, ["i0", "i3", "i5"], None],
        }
    )
    for model in (mf, network):
        answer = model.recommend(requests, k=3)
        for user in ("cold", "asks", "one"):
            assert answer[answer.user_id == user]["rank"].tolist() == [1, 2, 3], (model, user)
        cold = answer[answer.user_id == "cold"]
        assert cold.item_id.tolist() == ["i1", "i4", "i3"]  # most popular first
    one = mf.recommend(requests.iloc[[2]], k=1).reason.iloc[0]
    two = mf.recommend(requests.iloc[[1]].assign(items=None), k=1).reason.iloc[0]
    assert re.match(r"score -?[0-9.]+ from your 1 item(;|$)", one), one
    assert re.match(r"score -?[0-9.]+ from your 2 items(;|$)", two), two


def test_a_two_stage_cold_start_lists_only_trained_items_the_user_has_not_met(two_stage):
    data, model = two_stage
    ids = [str(i) for i in data.item_ids]
    popular = np.argsort(-model.retrieval.popularity, kind="stable")
    trained = np.ones(data.n_items, dtype=bool)
    trained[popular[0]] = False  # the most popular item: nobody trained it
    model = replace(model, trained=trained, positive_threshold=3.0)
    # a history of one item rated below the threshold: no known item, and that item is met
    requests = pd.DataFrame(
        {"user_id": ["u"], "history_items": [[ids[popular[1]]]], "history_ratings": [[1.0]]}
    )
    answer = model.recommend(requests, k=4)
    assert answer.item_id.tolist() == [ids[i] for i in popular[2:6]]


def test_a_two_stage_model_aligned_to_a_new_catalogue_maps_known_items_and_blanks_new_ones(
    two_stage,
):
    data, model = two_stage
    n = data.n_items
    old_ids = np.asarray(model.item_ids)
    titles = np.array([f"Title {i}" for i in range(n)], dtype=object)
    trained = ~np.isin(np.arange(n) % 5, (1, 2))  # old 0, 3, 5, 10 trained; 1, 7, 42 not
    year = pd.DataFrame({"year": 1990.0 + np.arange(n)})
    model = replace(model, titles=titles, trained=trained,
                    retrieval=replace(model.retrieval, item_features=year))  # fmt: skip
    source = np.array([7, 0, -1, 3, 42, -1, 5, 10])  # today's catalogue by old index; -1: new
    new_ids = np.array([old_ids[s] if s >= 0 else f"new-{i}" for i, s in enumerate(source)])

    aligned = align_recommender(model, new_ids)

    r, a = model.retrieval, aligned.retrieval
    known, new = np.flatnonzero(source >= 0), np.flatnonzero(source < 0)
    s = source[known]
    np.testing.assert_array_equal(a.item_factors[known], r.item_factors[s])
    np.testing.assert_array_equal(a.popularity[known], r.popularity[s])
    np.testing.assert_array_equal(
        a.similarity.toarray()[np.ix_(known, known)], r.similarity.toarray()[np.ix_(s, s)]
    )
    assert list(aligned.titles[known]) == list(titles[s])
    assert list(aligned.trained[known]) == list(trained[s])
    assert list(a.item_features["year"].iloc[known]) == list(year["year"].iloc[s])
    # items the model never saw: no factors, no popularity, no neighbours, untrained, no title
    assert not a.item_factors[new].any() and not a.popularity[new].any()
    assert not a.similarity.toarray()[new].any() and not a.similarity.toarray()[:, new].any()
    assert not aligned.trained[new].any() and all(t is None for t in aligned.titles[new])
    assert a.item_features["year"].iloc[new].isna().all()
