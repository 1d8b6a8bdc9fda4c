"""The timestamp bounds and the id cleaning of ``models.data.validate`` at the values where a
changed constant or comparison would show: the year 3000 to the second, the largest integer a
float holds exactly, ids that mix text and integers."""

from __future__ import annotations

import pandas as pd
import pytest

from models.data.errors import DataValidationError
from models.data.schema import TIMESTAMP, USER
from models.data.validate import validate_interactions

YEAR_3000 = int(pd.Timestamp("3000-01-01", tz="UTC").timestamp())
LARGEST_EXACT = 2**53  # every integer up to it is a float exactly; 2**53 + 1 is not


def _validate(users: list, timestamps: list | None = None) -> pd.DataFrame:
    raw = pd.DataFrame({"u": users, "i": range(len(users)), "r": [4.0] * len(users)})
    if timestamps is not None:
        raw["t"] = timestamps
    frame, _ = validate_interactions(
        raw, file="f.csv", user_col="u", item_col="i", rating_col="r",
        timestamp_col=None if timestamps is None else "t", rating_scale=(1.0, 5.0),
    )  # fmt: skip
    return frame


def test_the_last_second_before_the_year_3000_is_a_timestamp_and_the_year_3000_is_not():
    frame = _validate([1], [YEAR_3000 - 1])
    assert frame[TIMESTAMP].tolist() == [YEAR_3000 - 1]
    with pytest.raises(DataValidationError, match=f"value {YEAR_3000} is after the year 3000"):
        _validate([1], [YEAR_3000])


@pytest.mark.parametrize("seconds", [LARGEST_EXACT + 2, 2 * LARGEST_EXACT])
def test_a_timestamp_past_what_a_float_holds_exactly_is_out_of_range(seconds):
    with pytest.raises(DataValidationError, match=f"value {seconds} is out of range"):
        _validate([1], [seconds])


def test_the_largest_exact_timestamp_is_in_range_though_after_the_year_3000():
    with pytest.raises(DataValidationError, match="is after the year 3000"):
        _validate([1], [LARGEST_EXACT])


def test_mixed_ids_strip_the_text_and_keep_the_integers_as_given():
    frame = _validate([" a ", 5, "b"])
    assert frame[USER].tolist() == ["a", 5, "b"]
    assert type(frame[USER].iloc[1]) is int


def test_a_rating_scale_of_one_value_is_not_a_range():
    raw = pd.DataFrame({"u": [1], "i": [1], "r": [3.0]})
    with pytest.raises(DataValidationError, match=r"setting 'rating_scale'.* is not a valid range"):
        validate_interactions(raw, file="f.csv", user_col="u", item_col="i", rating_col="r",
                              timestamp_col=None, rating_scale=(3.0, 3.0))  # fmt: skip


def test_whole_float_ids_become_integers_and_a_fractional_one_is_refused():
    frame = _validate([1.0, 2.0, 1e15])
    assert frame[USER].tolist() == [1, 2, 10**15]
    with pytest.raises(DataValidationError, match=r"row 2, column 'u': value 2.5 is not a whole"):
        _validate([1.0, 2.5])


def test_the_first_second_of_1970_is_a_timestamp():
    assert _validate([1, 2], [0, 1])[TIMESTAMP].tolist() == [0, 1]
    with pytest.raises(DataValidationError, match="value -1 is out of range"):
        _validate([1], [-1])
