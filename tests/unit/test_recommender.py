import numpy as np
import pandas as pd
import pytest

from models.mf.als import RatingRows, solve_users
from models.mf.params import ItemParams
from models.mf.recommend import align_item_params, fold_in, top_k
from models.mf.recommender import MFRecommender
from models.recommenders import RequestError, check_requests


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
    assert warm["reason"].iloc[0].endswith("; ignored 1 unknown item(s): ghost")
    cold = out[out["user_id"] == "cold"]
    assert list(cold["item_id"]) == ["i1", "i4", "i3"]  # by popularity
    assert "no known items in history: most popular items" in cold["reason"].iloc[0]
    assert cold["score"].isna().all()  # a popularity count is not put in the rating column


def test_recommend_with_items_scores_them_best_first_clipped(recommender):
    requests = pd.DataFrame(
        {
            "user_id": ["u"],
            "history_items": [["i0"]],
            "history_ratings": [[5.0]],
            "items": [["i2", "nope", "i0"]],
        }
    )
    out = recommender.recommend(requests)
    scored, unknown = out.iloc[:2], out.iloc[2]  # the unknown one last, without a score
    assert set(scored["item_id"]) == {"i2", "i0"} and scored["score"].between(1, 5).all()
    assert out["rank"].tolist() == [1, 2, 3] and scored["score"].is_monotonic_decreasing
    full = recommender.recommend(requests.drop(columns="items"), k=len(recommender.item_ids))
    unseen = full[full.item_id == "i2"].score.iloc[0]
    assert out[out.item_id == "i2"].score.iloc[0] == pytest.approx(unseen)
    assert unknown["item_id"] == "nope" and np.isnan(unknown["score"])
    assert unknown["reason"] == "unknown item: not scored"
    assert "nope" not in "".join(scored["reason"])


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


def test_recommended_ratings_are_clipped_to_the_scale_and_ranked_by_item_bias():
    # zero item factors: a folded-in user is mean + user bias + item bias, so the ranking is the
    # item biases' order, and a mean of 10 puts every prediction above the 1-5 scale
    bias = np.array([0.3, -0.2, 0.9, 0.1, 0.5, -0.4])
    model = MFRecommender(ItemParams(np.zeros((6, 2)), bias, 10.0), np.array(list("abcdef")),
                          np.ones(6), 0.1, (1.0, 5.0))  # fmt: skip
    requests = pd.DataFrame(
        {"user_id": ["u"], "history_items": [["a", "b"]], "history_ratings": [[4.0, 5.0]]}
    )

    out = model.recommend(requests, k=3)

    assert list(out["item_id"]) == ["c", "e", "d"]  # biases 0.9, 0.5, 0.1 among unseen c..f
    assert (out["score"] == 5.0).all()
    assert (out["reason"] == "predicted rating 5.0 from your ratings of 2 items").all()


def test_every_mf_row_says_which_liked_item_it_is_closest_to():
    # 2-D factors: c points along a, d along b; f (rated 1, below the user's mean) points even
    # closer to c than a does, so it would be named if disliked items were not left out
    factors = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9], [0.0, 0.0], [0.95, 0.05]])
    model = MFRecommender(ItemParams(factors, np.zeros(6), 3.0), np.array(list("abcdef")),
                          np.ones(6), 0.1, (1.0, 5.0))  # fmt: skip
    requests = pd.DataFrame(
        {
            "user_id": ["u", "u2"],
            "history_items": [["a", "b", "f"], ["a", "b", "f"]],
            "history_ratings": [[5.0, 5.0, 1.0], [5.0, 5.0, 1.0]],
            "items": [None, ["c", "d", "e"]],
        }
    )

    out = model.recommend(requests, k=3).set_index(["user_id", "item_id"])

    for user in ("u", "u2"):
        for item, near in (("c", "a"), ("d", "b")):
            score = out.loc[(user, item), "score"]
            assert 1 <= score <= 5
            assert out.loc[(user, item), "reason"] == (
                f"predicted rating {score:.1f} from your ratings of 3 items; "
                f"closest to {near} you rated 5"
            )
    # e has zero factors: nothing is close to it, the reason still says where the score is from
    assert out.loc[("u2", "e"), "reason"] == (
        f"predicted rating {out.loc[('u2', 'e'), 'score']:.1f} from your ratings of 3 items"
    )


def test_an_mf_reason_names_the_liked_item_by_its_title_after_a_save_and_load(tmp_path):
    factors = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]])
    titles = np.array(["Alien (1979)", None, "Aliens (1986)", ""], dtype=object)
    model = MFRecommender(ItemParams(factors, np.zeros(4), 3.0), np.array(list("abcd")),
                          np.ones(4), 0.1, (1.0, 5.0), titles=titles)  # fmt: skip
    model.save(tmp_path / "m")
    loaded = MFRecommender.load(tmp_path / "m")
    requests = pd.DataFrame(
        {"user_id": ["u"], "history_items": [["a", "b"]], "history_ratings": [[5.0, 5.0]]}
    )

    reasons = loaded.recommend(requests, k=2).set_index("item_id")["reason"]

    assert reasons["c"].endswith("closest to Alien (1979) you rated 5")  # a's title
    assert reasons["d"].endswith("closest to b you rated 5")  # b has none: its id
    labels = [loaded.item_label(i) for i in range(4)]
    assert labels == ["Alien (1979)", "b", "Aliens (1986)", "d"]  # no title, an empty one: ids


def test_popularity_fallbacks_of_the_other_families_have_no_score():
    from models.neural.network import Architecture, init_params
    from models.neural.recommender import NeuralRecommender

    arch = Architecture(n_items=4, kind="dae", hidden=(), latent=2)
    model = NeuralRecommender(
        init_params(arch, np.random.default_rng(0)), arch, np.array(list("wxyz")),
        np.array([1.0, 9.0, 3.0, 0.0]),
    )  # fmt: skip

    out = model.recommend(pd.DataFrame({"user_id": ["new"], "history_items": [[]]}), k=2)

    assert list(out["item_id"]) == ["x", "y"] and out["score"].isna().all()
    assert (out["reason"] == "no known items in history: most popular items").all()


def test_every_recommender_kind_is_read_by_the_class_that_declares_it():
    from models.recommenders import RECOMMENDERS, recommender_class

    assert {kind: recommender_class(kind).kind for kind in RECOMMENDERS} == {
        "mf": "mf", "ranking": "ranking", "neural": "neural"
    }  # fmt: skip


ON_SCALE = "allowed: one rating in \\[1, 5\\] per history item"
NUMBERS = "allowed: one rating per history item, or an empty list"


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ({"history_items": [["i0", "i2"]]}, f"2 history item\\(s\\) but 0 rating.*{ON_SCALE}"),
        ({"history_items": [["i0", "i2"]], "history_ratings": [[]]}, f"2 history item\\(s\\) but 0 rating.*{ON_SCALE}"),
        ({"history_items": [["i0", "i2"]], "history_ratings": [[4.0]]}, f"history_ratings 1 ratings for 2 .*{NUMBERS}"),
        ({"history_items": [["i0", "i2"]], "history_ratings": [[9.0, -4.0]]}, f"rating 9.0 in .*{ON_SCALE}"),
        ({"history_items": [["i0"]], "history_ratings": [[float("nan")]]}, "rating nan in .*not a number"),
    ],
)  # fmt: skip
def test_a_rating_model_refuses_histories_without_ratings_on_its_scale(
    recommender, history, message
):
    """A missing rating read as 1 (or an off-scale one used as given) would fold the user in
    from made-up data, and the reason would say "you rated 1"."""
    requests = pd.DataFrame({"user_id": ["u1"], **history})
    with pytest.raises(RequestError, match=f"^request row 0 \\(user 'u1'\\): {message}"):
        recommender.recommend(requests)
    # a model without a scale reads a history without ratings as interactions of weight 1
    unscaled = MFRecommender(recommender.params, recommender.item_ids, recommender.popularity, 0.1)
    ones = unscaled.recommend(pd.DataFrame({"user_id": ["u1"], "history_items": [["i0", "i2"]]}))
    rated = unscaled.recommend(pd.DataFrame({"user_id": ["u1"], "history_items": [["i0", "i2"]],
                                             "history_ratings": [[1.0, 1.0]]}))  # fmt: skip
    pd.testing.assert_frame_equal(ones, rated)


def test_an_item_training_saw_no_rows_of_is_served_as_unknown(tmp_path):
    """An item of the catalogue without training rows keeps its random starting parameters:
    it is never recommended, not scored when asked, and ignored in a history."""
    params = _params(n_items=6)
    ids = np.array([f"i{i}" for i in range(6)])
    trained = np.array([True, True, True, True, False, False])
    popularity = np.array([9.0, 8.0, 7.0, 6.0, 0.0, 0.0])
    model = MFRecommender(params, ids, popularity, 0.1, (1.0, 5.0), trained)
    model.save(tmp_path / "m")
    model = MFRecommender.load(tmp_path / "m")
    np.testing.assert_array_equal(model.trained, trained)
    requests = pd.DataFrame({"user_id": ["u", "new"], "history_items": [["i0", "i5"], []],
                             "history_ratings": [[5.0, 1.0], []]})  # fmt: skip

    out = model.recommend(requests, k=6)

    assert set(out.item_id) <= {"i1", "i2", "i3"} | {"i0"} and not {"i4", "i5"} & set(out.item_id)
    assert len(out[out.user_id == "u"]) == 3 and len(out[out.user_id == "new"]) == 4
    assert "ignored 1 unknown item(s): i5" in out.reason.iloc[0]
    only_i0 = requests.iloc[:1].assign(history_items=[["i0"]], history_ratings=[[5.0]])
    np.testing.assert_allclose(  # i5 in the history changes nothing: as if not given
        out[out.user_id == "u"].score, model.recommend(only_i0, k=6).score, rtol=1e-12
    )
    alone = MFRecommender(params, ids, popularity, 0.1, (1.0, 5.0))
    asked = model.recommend(requests.iloc[:1].assign(items=[["i4", "i2"]]))
    assert asked.item_id.tolist() == ["i2", "i4"] and np.isnan(asked.score.iloc[1])
    assert asked.reason.iloc[1] == "unknown item: not scored"  # untrained: served as unknown
    assert list(model.known_items) == ["i0", "i1", "i2", "i3"]
    assert list(alone.known_items) == list(ids)  # without the mask (a private model): all


def test_an_empty_items_list_asks_for_nothing_and_a_missing_one_for_a_top_k_list():
    """``items: []`` scores no item: no rows (it used to get a top-K list, as if not asked);
    a row without the cell (None) still gets its top-K list."""
    from models.neural.network import Architecture, init_params
    from models.neural.recommender import NeuralRecommender

    mf = MFRecommender(_params(n_items=4), np.array(list("wxyz")), np.ones(4), 0.1, (1.0, 5.0))
    arch = Architecture(n_items=4, kind="vae", hidden=(3,), latent=2)
    neural = NeuralRecommender(
        init_params(arch, np.random.default_rng(0)), arch, np.array(list("wxyz")), np.ones(4)
    )
    requests = pd.DataFrame({"user_id": ["empty", "none"], "history_items": [["w"], ["w"]],
                             "history_ratings": [[5.0], [5.0]], "items": [[], None]})  # fmt: skip
    for model in (mf, neural):
        out = model.recommend(requests, k=2)
        assert out.user_id.tolist() == ["none", "none"], type(model).__name__


@pytest.mark.parametrize(
    ("requests", "k", "message"),
    [
        ({"user_id": ["u1"], "history_items": [["i0"]]}, 0, r"^k 0 is not a positive integer"),
        ({"user_id": ["u1"], "history_items": [["i0"]]}, -3, r"^k -3 is not"),
        ({"user_id": ["u1"], "history_items": [["i0"]]}, 2.5, r"^k 2.5 is not"),
        ({"user_id": ["u1"], "history_items": [["i0"]]}, True, r"^k True is not"),
        ({"user_id": ["u1"]}, 3, r"^requests have no history_items column"),
        ({"history_items": [["i0"]]}, 3, r"^requests have no user_id column"),
        ({"user_id": ["u1", "u2"], "history_items": [["i0"], "i0"]}, 3,
         r"^request row 1 \(user 'u2'\): history_items 'i0' is not a list"),
        ({"user_id": ["u1"], "history_items": [["i0"]], "items": ["i1"]}, 3,
         r"^request row 0 \(user 'u1'\): items 'i1' is not a list"),
        ({"user_id": ["u1"], "history_items": [["i0", "i1"]], "history_ratings": [[4.0]]}, 3,
         r"^request row 0 \(user 'u1'\): history_ratings 1 ratings for 2 history item\(s\)"),
        ({"user_id": ["u1"], "history_items": [["i0"]], "history_ratings": [4.0]}, 3,
         r"history_ratings 4.0 for 1 history item\(s\)"),
        ({"user_id": ["u1"], "history_items": [["i0"]], "history_ratings": [["4"]]}, 3,
         r"rating '4' in history_ratings is not a number"),
        ({"user_id": ["u1"], "history_items": [["i0"]], "history_ratings": [[float("inf")]]}, 3,
         r"rating inf in history_ratings is not a number"),
        # a missing id would be answered as the user 'None' (or 'nan')
        ({"user_id": ["u1", None], "history_items": [["i0"], []]}, 3,
         r"^request row 1: user_id (None|nan) is missing; allowed: the user's id"),
        ({"user_id": [float("nan")], "history_items": [["i0"]]}, 3, r"^request row 0: user_id nan"),
        ({"user_id": [" "], "history_items": [["i0"]]}, 3, r"^request row 0: user_id ' ' is missing"),
        # the answer's rows name the user only: two lists of one user could not be told apart
        ({"user_id": ["u1", "u2", 1, "u1"], "history_items": [["i0"], [], [], ["i3"]]}, 3,
         r"^request row 3: user_id 'u1' is also request row 0's; allowed: one row per user"),
        ({"user_id": ["1", 1.0], "history_items": [["i0"], ["i3"]]}, 3,
         r"^request row 1: user_id 1.0 is also request row 0's"),
    ],
)  # fmt: skip
def test_requests_no_recommender_can_answer_are_refused_naming_row_user_column_and_value(
    recommender, requests, k, message
):
    """A lone id would be read one character at a time, a negative ``k`` would slice from the
    end of the list, and ratings that do not pair with the items would be matched arbitrarily."""
    with pytest.raises(RequestError, match=message):
        check_requests(pd.DataFrame(requests), k)
    with pytest.raises(RequestError, match=message):
        recommender.recommend(pd.DataFrame(requests), k=k)


def test_requests_every_recommender_answers_pass_the_check():
    """Empty histories and cells, numpy arrays and integer ids (as MLflow's schema hands them
    over), an empty ratings list (no ratings) and ``items`` left empty for a top-k list."""
    check_requests(
        pd.DataFrame(
            {
                "user_id": ["u1", "u2", 7, "u4"],
                "history_items": [["i0", 3], [], np.array(["i1", "i2"]), None],
                "history_ratings": [[5, 4.5], [], None, []],
                "items": [None, ["i3"], np.array(["i0"]), float("nan")],
            }
        ),
        np.int64(5),
    )


def _integer_id_models():
    """A small MF and network recommender over the items ``0`` .. ``5`` (integer ids, as
    training reads a column of whole numbers; the two-stage model reads histories as the
    network does, through ``ServedItems.request_histories``)."""
    from models.neural.network import Architecture, init_params
    from models.neural.recommender import NeuralRecommender

    ids = np.arange(6)
    counts = np.array([5.0, 50, 1, 7, 9, 3])
    mf = MFRecommender(_params(), ids, counts, 0.1, (1.0, 5.0))
    arch = Architecture(n_items=6, kind="dae", hidden=(), latent=2)
    neural = NeuralRecommender(init_params(arch, np.random.default_rng(0)), arch, ids, counts)
    return {"mf": mf, "neural": neural}


@pytest.mark.parametrize("family", ["mf", "neural"])
def test_item_ids_that_came_through_a_float_column_are_the_integer_ids(family):
    """``[1.0, 4.0]`` is what pandas makes of integer ids after a merge that left a NaN; training
    reads such ids as the integers, so serving must too (as unknown ids they were recommended
    back to the user who had them)."""
    model = _integer_id_models()[family]
    ratings = {"history_ratings": [[5.0, 4.0]]} if family == "mf" else {}
    as_ints = model.recommend(
        pd.DataFrame({"user_id": ["u"], "history_items": [[1, 4]], **ratings}), k=4
    )
    as_floats = model.recommend(
        pd.DataFrame({"user_id": ["u"], "history_items": [np.array([1.0, 4.0])], **ratings}), k=4
    )
    pd.testing.assert_frame_equal(as_floats, as_ints)
    assert not {"1", "4"} & set(as_floats["item_id"].astype(str))
    assert "unknown" not in as_floats["reason"].iloc[0]
    scored = model.recommend(pd.DataFrame(
        {"user_id": ["u"], "history_items": [[1, 4]], "items": [[2.0, " 3"]], **ratings}), k=4)  # fmt: skip
    assert scored["score"].notna().all()  # asked ids are read the same way


def test_a_history_that_gives_an_item_twice_counts_its_last_rating_once(recommender):
    """As training reads a user's duplicate rows (the latest one), and as ``fedrec recommend``
    reads a history file."""
    twice = pd.DataFrame({"user_id": ["u"], "history_items": [["i0", "i2", "i3", "i0"]],
                          "history_ratings": [[3.0, 2.0, 5.0, 1.0]]})  # fmt: skip
    once = pd.DataFrame({"user_id": ["u"], "history_items": [["i2", "i3", "i0"]],
                         "history_ratings": [[2.0, 5.0, 1.0]]})  # fmt: skip
    pd.testing.assert_frame_equal(
        recommender.recommend(twice, k=3), recommender.recommend(once, k=3)
    )
    first = once.assign(history_ratings=[[2.0, 5.0, 3.0]])  # the first rating instead
    assert not recommender.recommend(twice, k=3).equals(recommender.recommend(first, k=3))


def test_a_history_that_gives_an_item_twice_is_read_by_its_last_rating_against_a_threshold():
    from models.recommenders import ServedItems

    served = ServedItems()
    served.item_ids, served.trained, served.titles = np.array(["a", "b", "c"]), None, None
    twice = pd.DataFrame({"user_id": ["u"], "history_items": [["a", "b", "a"]],
                          "history_ratings": [[5.0, 4.0, 1.0]]})  # fmt: skip
    (read,) = served.request_histories(twice, positive_threshold=3.0)
    assert list(read.positives) == [1] and list(read.met) == [0, 1]  # a's latest rating is 1
    (unrated,) = served.request_histories(twice.drop(columns="history_ratings"), 3.0)
    assert list(unrated.positives) == [0, 1]


def test_asked_items_come_best_first_and_those_without_a_score_last_whatever_the_sign():
    """A network's or a re-ranker's scores may be negative: an unscored item still comes last."""
    from models.recommenders import best_first

    nan = float("nan")
    asked = [("a", -3.0, ""), ("b", nan, ""), ("c", -1.0, ""), ("d", nan, ""), ("e", -1.0, "")]
    assert [item for item, _, _ in best_first(asked)] == ["c", "e", "a", "b", "d"]
