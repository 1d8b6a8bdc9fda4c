"""The timestamp bounds, the id cleaning and the user-side features of ``models.data.validate``
at the values where a changed constant or comparison would show: the year 3000 to the second,
the largest integer a float holds exactly, ids that mix text and integers, ages 0 and 150 and
the values around them, genders in either case, blank cells and a user's second value."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from models.data.errors import DataValidationError
from models.data.schema import TIMESTAMP, USER
from models.data.validate import (
    is_blank,
    require_column,
    user_feature_known,
    validate_interactions,
)

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


def _with_features(**columns: list) -> pd.DataFrame:
    """Four rows of users u1, u2, u1, u3 with the user-side feature ``columns``."""
    raw = pd.DataFrame({"u": ["u1", "u2", "u1", "u3"], "i": [1, 2, 3, 4], "r": [4.0] * 4})
    for name, values in columns.items():
        raw[name] = values
    frame, _ = validate_interactions(
        raw, file="f.csv", user_col="u", item_col="i", rating_col="r", timestamp_col=None,
        rating_scale=(1.0, 5.0), side_cols=tuple(columns),
    )  # fmt: skip
    return frame


def test_user_side_features_are_read_stripped_with_blank_cells_unknown():
    frame = _with_features(
        age=["30", " 150 ", "", "0"],
        gender=[" m", "F", None, "  "],
        occupation=[" nurse ", "", "nurse", "7"],
    )

    np.testing.assert_array_equal(frame["age"].to_numpy(), [30.0, 150.0, np.nan, 0.0])
    assert frame["age"].dtype == np.float64
    assert frame["gender"].tolist()[:2] == ["M", "F"] and frame["gender"].iloc[2:].isna().all()
    assert frame["occupation"].iloc[[0, 2, 3]].tolist() == ["nurse", "nurse", "7"]
    assert pd.isna(frame["occupation"].iloc[1])


def test_text_beside_numbers_in_a_user_column_is_stripped_too():
    """A Parquet column may hold text and integers together (pandas' "mixed-integer"): its text
    is read stripped, as a column of text only is, and a blank cell is unknown or missing."""
    side = _with_features(occupation=[" nurse ", 7, "nurse", 8], age=[" 30 ", 40, "30", " "])
    assert side["occupation"].tolist() == ["nurse", "7", "nurse", "8"]
    np.testing.assert_array_equal(side["age"].to_numpy(), [30.0, 40.0, 30.0, np.nan])

    raw = pd.DataFrame({"u": ["u1", "u2", "u1", "u3"], "i": [1, 2, 3, 4], "r": [4.0] * 4,
                        "region": [" north ", 5, "north", 6]})  # fmt: skip
    columns = dict(file="f.csv", user_col="u", item_col="i", rating_col="r",
                   timestamp_col=None, rating_scale=(1.0, 5.0), user_cols=("region",))  # fmt: skip
    frame, _ = validate_interactions(raw, **columns)
    assert frame["region"].tolist() == ["north", 5, "north", 6]
    raw.loc[1, "region"] = "  "
    with pytest.raises(
        DataValidationError,
        match=r"f.csv, row 2, column 'region': missing value; allowed: one value per user",
    ):
        validate_interactions(raw, **columns)


@pytest.mark.parametrize(
    ("column", "value", "allowed"),
    [
        ("age", "151", "a number of years in [0, 150], or an empty cell (unknown)"),
        ("age", "150.5", "a number of years in [0, 150]"),
        ("age", "-1", "a number of years in [0, 150]"),
        ("age", "nan", "a number of years in [0, 150]"),
        ("age", "inf", "a number of years in [0, 150]"),
        ("gender", "male", "M or F (either case), or an empty cell (unknown)"),
        ("gender", "MF", "M or F (either case)"),
    ],
)
def test_an_age_or_gender_the_ranker_cannot_read_is_refused_on_its_row(column, value, allowed):
    with pytest.raises(DataValidationError) as refused:
        _with_features(**{column: ["", value, "", ""]})

    assert str(refused.value).startswith(
        f"f.csv, row 2, column '{column}': value '{value}' is not a valid {column}; "
        f"allowed: {allowed}"
    )


@pytest.mark.parametrize(
    ("column", "values", "said"),
    [
        ("gender", ["M", "", "f", ""], "value 'F' differs from 'M' on row 1 (user 'u1')"),
        ("age", ["30", "", "31", ""], "value 31.0 differs from 30.0 on row 1 (user 'u1')"),
        ("occupation", ["a", "b", "c", "d"], "value 'c' differs from 'a' on row 1 (user 'u1')"),
    ],
)
def test_a_second_value_for_one_user_is_refused_on_its_row_naming_the_first(column, values, said):
    with pytest.raises(DataValidationError) as refused:
        _with_features(**{column: values})

    assert str(refused.value) == (
        f"f.csv, row 3, column '{column}': {said}; allowed: one {column} per user (empty cells "
        "are unknown)"
    )


def test_what_the_ranker_reads_as_known_and_what_is_blank():
    assert [user_feature_known("age", v) for v in ("0", " 150 ", 150, "150.01", "-0.5")] == [
        True, True, True, False, False,
    ]  # fmt: skip
    assert [user_feature_known("gender", v) for v in ("m", " F ", "", "x")] == [
        True, True, False, False,
    ]  # fmt: skip
    assert all(is_blank(v) for v in (None, math.nan, pd.NA, "", "  \t"))
    assert not any(is_blank(v) for v in ("x", 0, " 0 "))


def test_a_header_read_as_one_column_is_said_so_only_when_it_holds_the_column():
    one_column = pd.DataFrame({"user item rating": ["1 2 3"]})
    with pytest.raises(DataValidationError, match="the header reads as one column"):
        require_column(one_column, "item", file="f.csv")
    other = pd.DataFrame({"customer": ["1"]})
    with pytest.raises(DataValidationError) as refused:
        require_column(other, "item", file="f.csv")
    assert "reads as one column" not in str(refused.value)
