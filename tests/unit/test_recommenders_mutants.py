"""The served request checks and the shared helpers of ``models.recommenders``, at the values
where a changed operator or constant would show: cells that are lists of lists, values quoted
at and past the 60-character cut, items with no training rows, saved states without a kind."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from models.mf.recommender import MFRecommender
from models.recommenders import (
    STATE,
    RequestError,
    ServedItems,
    check_requests,
    read_recommender,
    rows_matrix,
    seen_in_training,
)

ROW = r"^request row 0 \(user 'u1'\): "


@pytest.mark.parametrize(
    "cell",
    [
        [["i0", "i1"]],  # a list of lists: not a list of ids
        np.array([["i0", "i1"]]),  # a 2-D array
        [["i0"], ["i1", "i2"]],  # ragged: numpy gives it no shape at all
    ],
    ids=["nested-list", "2d-array", "ragged"],
)
@pytest.mark.parametrize("column", ["history_items", "items"])
def test_a_cell_of_lists_is_refused_in_one_line_not_read_as_a_list(column, cell):
    requests = {"user_id": ["u1"], "history_items": [["i0"]], column: [cell]}
    with pytest.raises(RequestError, match=ROW + f"{column} .* is not a list"):
        check_requests(pd.DataFrame(requests), 3)


def test_ratings_that_are_a_list_of_lists_are_refused_in_one_line():
    requests = {"user_id": ["u1"], "history_items": [["i0", "i1"]],
                "history_ratings": [[[4.0, 5.0]]]}  # fmt: skip
    with pytest.raises(RequestError, match=ROW + "history_ratings .* for 2 history item"):
        check_requests(pd.DataFrame(requests), 3)


def _refused_value(history: str) -> str:
    with pytest.raises(RequestError) as refused:
        check_requests(pd.DataFrame({"user_id": ["u1"], "history_items": [history]}), 3)
    message = str(refused.value)
    start = message.index("history_items ") + len("history_items ")
    return message[start : message.index(" is not a list")]


def test_a_value_is_quoted_whole_up_to_60_characters_and_cut_with_dots_after():
    exact = "x" * 58  # repr adds two quotes: 60 characters
    assert _refused_value(exact) == repr(exact)
    longer = "y" * 59  # 61 characters
    shown = _refused_value(longer)
    assert shown == repr(longer)[:57] + "..."
    assert len(shown) == 60


def test_an_item_is_seen_in_training_only_with_rows_some_client_had():
    counts = np.array([0, 3, 0, 1])
    assert seen_in_training(None, counts).tolist() == [c != 0 for c in counts]
    previous = np.array([True, False, False, False])
    assert seen_in_training(previous, counts).tolist() == [True, True, False, True]


def _mf() -> MFRecommender:
    from models.mf.params import ItemParams

    rng = np.random.default_rng(0)
    params = ItemParams(rng.normal(size=(3, 2)), rng.normal(size=3), 3.5)
    return MFRecommender(params, np.array(["a", "b", "c"]), np.array([3.0, 2, 1]), 0.1, (1.0, 5.0))


def test_a_saved_state_is_read_by_its_kind_and_one_without_a_kind_as_mf(tmp_path):
    model = _mf()
    model.save(tmp_path)
    assert type(read_recommender(tmp_path)) is MFRecommender
    state = json.loads((tmp_path / STATE).read_text())
    del state["kind"]  # as states saved before the kind was recorded
    (tmp_path / STATE).write_text(json.dumps(state))
    loaded = read_recommender(tmp_path)
    assert type(loaded) is MFRecommender
    np.testing.assert_array_equal(loaded.item_ids, model.item_ids)


def test_a_folder_without_a_state_or_of_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a fedrec recommender"):
        read_recommender(tmp_path)
    (tmp_path / STATE).write_text(json.dumps({"kind": "forest"}))
    with pytest.raises(ValueError, match="recommender kind 'forest' is unknown"):
        read_recommender(tmp_path)


def test_k_of_1_is_the_smallest_k_allowed():
    requests = pd.DataFrame({"user_id": ["u1"], "history_items": [["i0"]]})
    check_requests(requests, 1)
    check_requests(requests, np.int64(1))
    with pytest.raises(RequestError, match=r"^k 0 is not a positive integer"):
        check_requests(requests, np.int64(0))


def test_a_true_among_numeric_ratings_is_refused_as_no_rating():
    # numpy reads [4.0, True] as the floats [4.0, 1.0]: the bool must be seen per value
    requests = {"user_id": ["u1"], "history_items": [["i0", "i1"]],
                "history_ratings": [[4.0, True]]}  # fmt: skip
    with pytest.raises(RequestError, match=ROW + "rating True in history_ratings is not a number"):
        check_requests(pd.DataFrame(requests), 3)


def test_the_matrix_of_no_rows_is_empty_and_rows_set_their_indices():
    empty = rows_matrix([], 4)
    assert empty.shape == (0, 4) and empty.nnz == 0
    rows = [np.array([0, 3]), np.array([], dtype=np.int64), np.array([2])]
    dense = np.zeros((3, 4))
    for user, items in enumerate(rows):
        dense[user, items] = 1.0
    np.testing.assert_array_equal(rows_matrix(rows, 4).toarray(), dense)


class _Served(ServedItems):
    def __init__(self, item_ids: np.ndarray, trained: np.ndarray | None) -> None:
        self.item_ids, self.trained = item_ids, trained


@pytest.mark.parametrize("n_unknown", [4, 5, 6, 7])
def test_the_note_of_unknown_items_names_five_and_marks_more_with_dots(n_unknown):
    served = _Served(np.array(["a", "b"]), None)
    unknown = [f"x{k}" for k in range(n_unknown)]
    requests = pd.DataFrame({"user_id": ["u1"], "history_items": [["a", *unknown]]})
    (history,) = served.request_histories(requests, None)
    named = ", ".join(unknown[:5])
    more = " ..." if n_unknown > len(unknown[:5]) else ""
    assert history.note == f"ignored {n_unknown} unknown item(s): {named}{more}"
    assert history.positives.tolist() == [0] and history.met.tolist() == [0]
