import numpy as np
import pandas as pd
import pytest

from models.mf.als import RatingRows, solve_users
from models.mf.params import ItemParams
from models.mf.recommend import align_item_params, fold_in, top_k
from models.mf.recommender import MFRecommender


def _params(n_items=6, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return ItemParams(rng.normal(size=(n_items, k)), rng.normal(size=n_items), 3.5)


def test_fold_in_of_several_histories_equals_per_user_closed_form():
    params = _params()
    histories = [
        (np.array([0, 2, 3]), np.array([5.0, 3.0, 4.0])),
        (np.array([], int), np.array([])),
        (np.array([1]), np.array([2.0])),
    ]

    folded = fold_in(histories, params, reg=0.1)

    for u, (items, ratings) in enumerate(histories):
        alone = solve_users(
            RatingRows(np.zeros(len(items), int), items, ratings, n_users=1, n_items=6),
            params,
            reg=0.1,
        )
        np.testing.assert_allclose(folded.factors[u], alone.factors[0], atol=1e-12)
        np.testing.assert_allclose(folded.bias[u], alone.bias[0], atol=1e-12)
    assert np.all(folded.factors[1] == 0) and folded.bias[1] == 0  # empty history: mean + item bias


def test_top_k_skips_excluded_and_orders_best_first():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    best, values = top_k(scores, np.array([False, True, False, False, False]), 3)
    assert list(best) == [3, 2, 4] and list(values) == [0.7, 0.5, 0.3]
    assert top_k(scores, np.ones(5, bool), 3)[0].size == 0


def test_align_item_params_maps_by_id_and_zeroes_new_items():
    params = _params(n_items=3)
    aligned = align_item_params(params, np.array(["a", "b", "c"]), np.array(["c", "new", "a"]))
    np.testing.assert_array_equal(aligned.factors[0], params.factors[2])
    np.testing.assert_array_equal(aligned.factors[2], params.factors[0])
    assert np.all(aligned.factors[1] == 0) and aligned.bias[1] == 0


@pytest.fixture
def recommender():
    return MFRecommender(
        _params(),
        np.array(["i0", "i1", "i2", "i3", "i4", "i5"]),
        np.array([5.0, 50, 1, 7, 9, 3]),
        0.1,
        (1.0, 5.0),
    )


def test_recommend_excludes_history_reports_unknown_items_and_falls_back(recommender):
    requests = pd.DataFrame(
        {
            "user_id": ["u", "cold"],
            "history_items": [["i0", "i3", "ghost"], ["ghost"]],
            "history_ratings": [[5.0, 1.0, 4.0], [3.0]],
        }
    )

    out = recommender.recommend(requests, k=3)

    warm = out[out["user_id"] == "u"]
    assert list(warm["rank"]) == [1, 2, 3] and not {"i0", "i3"} & set(warm["item_id"])
    assert warm["reason"].iloc[0] == "ignored 1 unknown item(s): ghost"
    cold = out[out["user_id"] == "cold"]
    assert list(cold["item_id"]) == ["i1", "i4", "i3"]  # by popularity
    assert "popularity fallback" in cold["reason"].iloc[0]


def test_recommend_with_items_scores_them_in_order_clipped(recommender):
    requests = pd.DataFrame(
        {
            "user_id": ["u"],
            "history_items": [["i0"]],
            "history_ratings": [[5.0]],
            "items": [["i2", "nope", "i0"]],
        }
    )
    out = recommender.recommend(requests)
    assert list(out["item_id"]) == ["i2", "i0"] and out["score"].between(1, 5).all()
    assert "unknown item(s) not scored: nope" in out["reason"].iloc[0]


def test_save_load_round_trip_without_pickle(recommender, tmp_path):
    recommender.save(tmp_path / "m")
    loaded = MFRecommender.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.params.factors, recommender.params.factors)
    np.testing.assert_array_equal(loaded.item_ids, recommender.item_ids)
    assert loaded.reg == 0.1 and loaded.rating_scale == (1.0, 5.0)
    with np.load(
        tmp_path / "m" / "item_params.npz", allow_pickle=False
    ) as data:  # loads with pickle off
        assert set(data.files) == {"factors", "bias", "global_mean"}


def test_warm_start_carries_known_items_and_keeps_new_ones_fresh():
    from models.mf.recommend import warm_start_params

    previous = _params(n_items=3, k=2, seed=1)
    fresh = ItemParams(np.full((4, 2), 9.0), np.full(4, 9.0), 3.9)

    warm, carried = warm_start_params(
        fresh, previous, np.array(["a", "b", "c"]), np.array(["b", "new", "a", "c"])
    )

    assert carried == 3 and warm.global_mean == 3.9
    np.testing.assert_array_equal(warm.factors[[0, 2, 3]], previous.factors[[1, 0, 2]])
    np.testing.assert_array_equal(
        warm.factors[1], [9.0, 9.0]
    )  # a new item keeps its initialisation
    with pytest.raises(ValueError, match="cannot warm-start 2 factors from a model with 5"):
        warm_start_params(
            fresh, _params(n_items=3, k=5), np.array(["a", "b", "c"]), np.array(["a"])
        )


def test_scoring_items_for_a_user_without_history_says_how(recommender):
    requests = pd.DataFrame(
        {
            "user_id": ["new"],
            "history_items": [[]],
            "history_ratings": [[]],
            "items": [["i1", "i2"]],
        }
    )
    out = recommender.recommend(requests)
    expected = np.clip(recommender.params.global_mean + recommender.params.bias[[1, 2]], 1, 5)
    np.testing.assert_allclose(out["score"], expected)
    assert out["reason"].iloc[0] == "no known items in history: scored by global mean and item bias"
