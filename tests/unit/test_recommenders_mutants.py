"""The served request checks and the shared helpers of ``models.recommenders``, at the values
where a changed operator or constant would show: cells that are lists of lists, values quoted
at and past the 60-character cut, items with no training rows, saved states without a kind."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.recommenders import RequestError, check_requests

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
