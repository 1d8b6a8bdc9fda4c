"""Bad input gets one clear line naming file, row, column, value and what is allowed; good input reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.data.errors import DataValidationError
from models.data.movielens import read_movielens_1m, read_movielens_100k
from models.data.readers import load_dataset, read_interactions
from models.data.schema import (
    ITEM,
    RATING,
    TIMESTAMP,
    USER,
    Interactions,
    keep_positives,
    require_ratings,
)
from models.data.validate import validate_interactions

HEADER = "user_id,item_id,rating\n"
HEADER_TS = "user_id,item_id,rating,timestamp\n"
LATIN1 = (HEADER + "1,Heat,4\n2,Mis\xe9rables,3\n").encode("latin-1")
LATIN1_OFFSET = LATIN1.index(b"\xe9")


def _load_spec(path: Path, **kw: Any) -> Interactions:
    return load_dataset(str(path), **kw)


@dataclass(frozen=True)
class BadInput:
    """Files to write under tmp_path (None makes a folder), the path to read, the message parts."""

    files: dict[str, str | bytes | pd.DataFrame | None]
    target: str
    expected: tuple[str, ...]
    reader: Callable[..., Interactions] = read_interactions
    kwargs: dict[str, Any] = field(default_factory=dict)
    # The message starts with this file's path (relative to tmp_path); None when no file applies.
    named: str | None = ""


BAD_INPUTS = [
    pytest.param(
        BadInput({}, "nope.csv", ("no such file", "allowed: an existing file")), id="missing-file"
    ),
    pytest.param(
        BadInput({"ratings.csv": None}, "ratings.csv", ("is a directory", "allowed: a file (.csv")),
        id="directory",
    ),
    pytest.param(
        BadInput({"ratings.csv": b""}, "ratings.csv", ("is empty (0 bytes)",)), id="empty-file"
    ),
    pytest.param(
        BadInput({"ratings.csv": "\n \n\n"}, "ratings.csv", ("is empty",)), id="blank-lines-only"
    ),
    pytest.param(
        BadInput({"ratings.csv": HEADER}, "ratings.csv", ("has no data rows",)), id="header-only"
    ),
    pytest.param(
        BadInput(
            {"ratings.xlsx": HEADER + "1,2,3\n"},
            "ratings.xlsx",
            (
                "unsupported file type '.xlsx'",
                "allowed: .csv, .tsv, .txt, .csv.gz, .tsv.gz, .txt.gz, .parquet, .pq",
            ),
        ),
        id="unsupported-extension",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": LATIN1},
            "ratings.csv",
            (
                "row 2",
                "column 'item_id'",
                f"byte 0xe9 at byte offset {LATIN1_OFFSET} (line 3) is not valid UTF-8",
                "latin-1",
            ),
        ),
        id="latin1-bytes",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": "usr_id,item_id,rating\n1,2,3\n"},
            "ratings.csv",
            (
                "column 'user_id'",
                "column not found (did you mean 'usr_id'?)",
                "allowed: one of the columns present: 'usr_id', 'item_id', 'rating'",
            ),
        ),
        id="user-column-typo",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,4\n2,11,good\n"},
            "ratings.csv",
            ("row 2", "column 'rating'", "value 'good' is not a number", "[1.0, 5.0]"),
        ),
        id="non-numeric-rating",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,\n2,11,3\n"},
            "ratings.csv",
            ("row 1", "column 'rating'", "missing rating", "allowed: a number in [1.0, 5.0]"),
        ),
        id="nan-rating",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,4\n2,11,3\n3,12,6\n"},
            "ratings.csv",
            ("row 3", "column 'rating'", "value 6.0 is outside the rating scale", "[1.0, 5.0]"),
        ),
        id="rating-above-scale",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,0.5\n"},
            "ratings.csv",
            ("row 1", "value 0.5 is outside the rating scale", "allowed: a number in [1.0, 5.0]"),
        ),
        id="rating-below-scale",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,4\n2,11,inf\n"},
            "ratings.csv",
            ("row 2", "value inf is outside the rating scale"),
        ),
        id="infinite-rating",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,4\n   ,11,3\n"},
            "ratings.csv",
            (
                "row 2",
                "column 'user_id'",
                "value '   ' is an empty or whitespace-only id",
                "allowed: a non-empty string or integer id",
            ),
        ),
        id="empty-user-id",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,4\n2,11,3\n3,,5\n"},
            "ratings.csv",
            ("row 3", "column 'item_id'", "missing id"),
        ),
        id="empty-item-id",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER_TS + "1,10,4,978300760\n2,11,3,yesterday\n"},
            "ratings.csv",
            ("row 2", "column 'timestamp'", "value 'yesterday' is not a timestamp", "ISO-8601"),
        ),
        id="unparseable-timestamp",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER_TS + "1,10,4,978300760\n2,11,3,-5\n"},
            "ratings.csv",
            ("row 2", "column 'timestamp'", "value -5 is out of range", "Unix seconds >= 0"),
        ),
        id="negative-timestamp",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER_TS + "1,10,4,1969-12-31T23:59:59Z\n"},
            "ratings.csv",
            ("row 1", "value '1969-12-31T23:59:59Z' is out of range"),
        ),
        id="iso-timestamp-before-1970",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER_TS + "1,10,4,978300760\n" + HEADER_TS + "2,11,3,978300761\n"},
            "ratings.csv",
            (
                "row 2 (line 3): repeats the header (files joined with their headers?)",
                "allowed: one header line, the first",
            ),
        ),
        id="repeated-header",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER_TS + "1,10,4,978300760\n2,11,3,978300760000\n"},
            "ratings.csv",
            (
                "row 2",
                "column 'timestamp'",
                "value 978300760000 is after the year 3000 as "
                "seconds: milliseconds since 1970? (divide by 1000)",
                "Unix seconds",
            ),
        ),
        id="millisecond-timestamp",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER_TS + "1,10,4,978300760.5\n"},
            "ratings.csv",
            ("row 1", "value 978300760.5 is not a whole number of seconds"),
        ),
        id="fractional-timestamp",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,4\n2,11,3,99\n"},
            "ratings.csv",
            ("row 2", "has 4 fields (line 3 of the file)", "allowed: 3 fields"),
        ),
        id="ragged-row",
    ),
    pytest.param(
        BadInput(
            {"ratings.parquet": b"PAR1 this is not parquet PAR1"},
            "ratings.parquet",
            ("is not a readable Parquet file",),
        ),
        id="corrupt-parquet",
    ),
    pytest.param(
        BadInput(
            {"ratings.parquet": pd.DataFrame({"user_id": [1], "item": [2], "rating": [3.0]})},
            "ratings.parquet",
            ("column 'item_id'", "(did you mean 'item'?)"),
        ),
        id="parquet-missing-item-column",
    ),
    pytest.param(
        BadInput(
            {"ratings.parquet": pd.DataFrame({"user_id": ["a", None], "item_id": [1, 2]})},
            "ratings.parquet",
            ("row 2", "column 'user_id'", "missing id"),
        ),
        id="parquet-null-user-id",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,4\n"},
            "ratings.csv",
            ("column 'stars'", "column not found", "'user_id', 'item_id', 'rating'"),
            kwargs={"rating_col": "stars"},
        ),
        id="custom-rating-column-absent",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER + "1,10,4\n"},
            "ratings.csv",
            ("setting 'rating_scale': value (5.0, 1.0) is not a valid range",),
            kwargs={"rating_scale": (5.0, 1.0)},
        ),
        id="inverted-rating-scale",
    ),
    pytest.param(
        BadInput(
            {"ml/u.item": "1|Heat (1995)|01-Jan-1995||x\n"},
            "ml",
            ("file not found in the MovieLens 100K folder", "u.data, u.item, u.user, u.genre"),
            reader=read_movielens_100k,
            named="ml/u.data",
        ),
        id="movielens-100k-without-u.data",
    ),
    pytest.param(
        BadInput(
            {"ml/ratings.dat": "1::1::5::978300760\n"},
            "ml",
            ("file not found in the MovieLens 1M folder",),
            reader=read_movielens_1m,
            named="ml/movies.dat",
        ),
        id="movielens-1m-without-movies.dat",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": "user_id,item_id,rating,rating\n1,10,4,9\n"},
            "ratings.csv",
            (
                "column 'rating'",
                "is named 2 times in the header",
                "allowed: each column named once",
            ),
        ),
        id="column-named-twice",
    ),
    pytest.param(
        BadInput(
            {"ratings.parquet": pd.DataFrame({"user_id": [1], "item_id": [2], "rating": [True]})},
            "ratings.parquet",
            ("column 'rating'", "has type bool", "allowed: a number"),
        ),
        id="parquet-boolean-ratings",
    ),
    pytest.param(
        BadInput(
            {
                "ratings.parquet": pd.DataFrame(
                    {
                        "user_id": [1],
                        "item_id": [2],
                        "rating": pd.to_datetime([1_600_000_000], unit="s"),
                    }
                )
            },
            "ratings.parquet",
            ("column 'rating'", "has type datetime64", "allowed: a number"),
        ),
        id="parquet-datetime-ratings",
    ),
    pytest.param(
        BadInput(
            {"ratings.parquet": pd.DataFrame({"user_id": [True], "item_id": [2], "rating": [3.0]})},
            "ratings.parquet",
            ("column 'user_id'", "has type bool", "allowed: a non-empty string or integer id"),
        ),
        id="parquet-boolean-ids",
    ),
    pytest.param(
        BadInput(
            {"ratings.parquet": pd.DataFrame({"user_id": [1, 2], "item_id": [[5], [6]]})},
            "ratings.parquet",
            ("row 1", "column 'item_id'", "is neither text nor a number", "1 more row"),
        ),
        id="parquet-list-ids",
    ),
    pytest.param(
        BadInput(
            {"ratings.parquet": pd.DataFrame({"user_id": [b"u1"], "item_id": [2]})},
            "ratings.parquet",
            ("row 1", "column 'user_id'", "value b'u1' is neither text nor a number"),
        ),
        id="parquet-bytes-ids",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": (HEADER + "1,2,3\n").encode("utf-16")},
            "ratings.csv",
            ("byte 0xff at byte offset 0", "the file is UTF-16", "iconv -f utf-16 -t utf-8"),
        ),
        id="utf16-text",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": (HEADER + "1,2,3\n").encode("utf-16-le")},
            "ratings.csv",
            ("has NUL bytes in its header (byte offset 1)", "iconv -f utf-16le -t utf-8"),
        ),
        id="utf16-text-without-byte-order-mark",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER.encode() + bytes(range(256)) * 4},
            "ratings.csv",
            ("is not valid UTF-8", "if the file is latin-1"),
        ),
        id="binary-bytes-are-not-called-utf16",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": "user_id item_id rating\n1 2 3\n"},
            "ratings.csv",
            ("column 'user_id'", "the header reads as one column", "'user_id item_id rating'"),
        ),
        id="unknown-delimiter",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER_TS + "1,2,3,100\n"},
            "ratings.csv",
            ("setting 'item_col'", "value 'item_id' is named by user_col too"),
            kwargs={"user_col": "item_id"},
        ),
        id="one-column-as-user-and-item",
    ),
    pytest.param(
        BadInput(
            {"ratings.csv": HEADER_TS + "1,2,3,100\n"},
            "ratings.csv",
            ("setting 'timestamp_col'", "value 'user_id' is named by user_col too"),
            kwargs={"timestamp_col": "user_id"},
        ),
        id="one-column-as-user-and-time",
    ),
    pytest.param(
        BadInput(
            {},
            "no-such-dataset",
            ("unknown dataset", "allowed: 'synthetic', 'ml-100k', 'ml-1m', a MovieLens folder"),
            reader=_load_spec,
            named=None,
        ),
        id="unknown-dataset-spec",
    ),
    pytest.param(
        BadInput(
            {"empty": None},
            "empty",
            ("holds neither u.data nor ratings.dat",),
            reader=_load_spec,
        ),
        id="folder-without-movielens-files",
    ),
]


def _write(root: Path, files: dict[str, str | bytes | pd.DataFrame | None]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        elif isinstance(content, pd.DataFrame):
            content.to_parquet(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_line_naming_the_problem(tmp_path: Path, case: BadInput) -> None:
    # Prepare
    _write(tmp_path, case.files)
    target = tmp_path / case.target

    # Execute
    with pytest.raises(DataValidationError) as caught:
        case.reader(target, **case.kwargs)

    # Assert
    message = str(caught.value)
    assert "\n" not in message
    if case.named is not None:
        assert message.startswith(str(tmp_path / (case.named or case.target)))
    for part in case.expected:
        assert part in message


def _read_csv_text(tmp_path: Path, text: str, **kw: Any) -> Interactions:
    path = tmp_path / "ratings.csv"
    path.write_text(text, encoding="utf-8")
    return read_interactions(path, **kw)


def _rows(data: Interactions) -> dict[tuple[Any, Any], float]:
    """(caller user id, caller item id) -> rating, to compare without internal ids."""
    users = data.user_ids[data.frame[USER].to_numpy()]
    items = data.item_ids[data.frame[ITEM].to_numpy()]
    return dict(
        zip(zip(users.tolist(), items.tolist(), strict=True), data.frame[RATING], strict=True)
    )


def test_duplicates_keep_the_latest_by_timestamp_with_a_note(tmp_path: Path) -> None:
    # Prepare
    text = HEADER_TS + "a,x,2,100\na,x,5,300\na,x,3,200\nb,x,4,50\nb,x,1,10\nb,y,3,20\n"

    # Execute
    data = _read_csv_text(tmp_path, text)

    # Assert
    assert _rows(data) == {("a", "x"): 5.0, ("b", "x"): 4.0, ("b", "y"): 3.0}
    assert len(data) == 3
    assert any(
        "dropped 3 duplicate (user, item) rows, kept the latest of each" in note
        for note in data.notes
    )


def test_duplicates_without_timestamps_keep_the_last_row(tmp_path: Path) -> None:
    # Prepare
    text = HEADER + "a,x,2\nb,x,1\na,x,4\n"

    # Execute
    data = _read_csv_text(tmp_path, text)

    # Assert
    assert _rows(data) == {("a", "x"): 4.0, ("b", "x"): 1.0}
    assert TIMESTAMP not in data.frame
    assert any("dropped 1 duplicate" in note and "file order" in note for note in data.notes)


def test_repeats_summed_count_each_purchase_on_the_latest_row(tmp_path: Path) -> None:
    # Prepare: purchases with a quantity column, and a log without one (each row counts 1)
    rows = [("a", "x", 2, 100), ("a", "x", 5, 300), ("a", "x", 3, 200), ("b", "x", 4, 50),
            ("b", "x", 1, 10), ("b", "y", 3, 20), ("c", "y", 7, 5)]  # fmt: skip
    text = HEADER_TS + "".join(f"{u},{i},{q},{t}\n" for u, i, q, t in rows)
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    oracle = frame.groupby(["user", "item"]).agg(
        rating=("rating", "sum"), last=("timestamp", "max")
    )

    # Execute
    summed = _read_csv_text(tmp_path, text, rating_scale=(1.0, 10.0), repeats="sum")
    counted = _read_csv_text(tmp_path, text, rating_col=None, repeats="sum")
    latest = _read_csv_text(tmp_path, text, rating_scale=(1.0, 10.0))

    # Assert
    assert _rows(summed) == oracle["rating"].astype(float).to_dict()
    assert _rows(counted) == frame.groupby(["user", "item"]).size().astype(float).to_dict()
    assert _rows(latest) == {("a", "x"): 5.0, ("b", "x"): 4.0, ("b", "y"): 3.0, ("c", "y"): 7.0}
    stamps = summed.frame.assign(
        user=summed.user_ids[summed.frame[USER]], item=summed.item_ids[summed.frame[ITEM]]
    ).set_index(["user", "item"])[TIMESTAMP]
    assert stamps.sort_index().tolist() == oracle["last"].tolist()  # the latest row stands
    assert any(
        "added 3 repeated (user, item) rows to the latest of each" in n for n in summed.notes
    )


def test_string_ids_round_trip_stripped_and_leading_zeros_kept(tmp_path: Path) -> None:
    # Prepare
    text = HEADER + "007,x1,4\n  alice ,x2,3\nbob,x1,5\n"

    # Execute
    data = _read_csv_text(tmp_path, text)

    # Assert
    assert data.user_ids.tolist() == ["007", "alice", "bob"]
    assert data.item_ids.tolist() == ["x1", "x2"]
    assert _rows(data) == {("007", "x1"): 4.0, ("alice", "x2"): 3.0, ("bob", "x1"): 5.0}


def test_integer_ids_in_csv_become_int64(tmp_path: Path) -> None:
    # Prepare
    text = HEADER + "12,7,4\n3,7,3\n"

    # Execute
    data = _read_csv_text(tmp_path, text)

    # Assert
    assert data.user_ids.dtype == np.int64
    assert data.user_ids.tolist() == [3, 12]
    assert data.item_ids.tolist() == [7]


def test_iso_timestamps_are_parsed_to_unix_seconds(tmp_path: Path) -> None:
    # Prepare
    text = (
        HEADER_TS
        + "1,10,4,2000-01-01T00:00:00Z\n1,11,3,1970-01-02\n1,12,5,2000-01-01T01:00:00+01:00\n"
        + "1,13,2,978300760\n"
    )

    # Execute
    data = _read_csv_text(tmp_path, text)

    # Assert
    assert data.frame[TIMESTAMP].dtype == np.int64
    assert data.frame[TIMESTAMP].tolist() == [946684800, 86400, 946684800, 978300760]


def test_missing_rating_column_means_implicit_feedback(tmp_path: Path) -> None:
    # Prepare
    text = "user_id,item_id\n1,10\n2,11\n2,12\n"

    # Execute
    data = _read_csv_text(tmp_path, text)

    # Assert
    assert data.frame[RATING].tolist() == [1.0, 1.0, 1.0]
    assert data.rating_scale is None
    assert any("implicit feedback" in note for note in data.notes)


def test_rating_col_none_ignores_a_rating_column(tmp_path: Path) -> None:
    # Prepare
    text = HEADER + "1,10,4\n2,11,2\n"

    # Execute
    data = _read_csv_text(tmp_path, text, rating_col=None)

    # Assert
    assert data.frame[RATING].tolist() == [1.0, 1.0]
    assert data.rating_scale is None


def test_positive_threshold_keeps_rows_at_or_above_it_and_refuses_one_that_keeps_none(
    tmp_path: Path,
) -> None:
    data = _read_csv_text(tmp_path, HEADER + "1,10,2\n1,11,4\n2,10,4.5\n")

    kept = keep_positives(data, 4.0)
    assert kept.frame[RATING].tolist() == [4.0, 4.5] and kept.n_users == data.n_users
    with pytest.raises(DataValidationError) as refused:
        keep_positives(data, 4.6)
    assert str(refused.value) == (
        f"{data.source}, setting 'positive_threshold': value 4.6 keeps no row as a positive "
        "(the highest rating is 4.5); allowed: a threshold <= 4.5"
    )
    assert len(keep_positives(data, 4.6, empty_ok=True).frame) == 0  # one site among many
    clicks = _read_csv_text(tmp_path, "user_id,item_id,score\n1,10,2\n1,11,4\n")  # no "rating"
    with pytest.raises(DataValidationError) as unrated:
        keep_positives(clicks, 3.0)
    assert str(unrated.value).endswith(
        "keeps no row as a positive (the highest rating is 1, as the data has no rating column: "
        "every row counts 1); allowed: a threshold <= 1, or name the rating column (--rating-col)"
    )


def test_a_rating_model_refuses_data_read_without_ratings(tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("user_id,item_id\n1,10\n2,10\n")
    implicit = read_interactions(path)
    assert implicit.frame[RATING].tolist() == [1.0, 1.0]  # what a rating model would see

    with pytest.raises(DataValidationError) as refused:
        require_ratings(implicit, "rating")
    assert str(refused.value).startswith(
        f"{path}, column 'rating': has no ratings: every row would count as the same rating"
    )
    rated = _read_csv_text(tmp_path, HEADER + "1,10,4\n")
    assert require_ratings(rated, "rating") is rated


def test_rating_scale_none_is_taken_from_the_data(tmp_path: Path) -> None:
    # Prepare
    text = HEADER + "1,10,0.5\n2,11,10\n"

    # Execute
    data = _read_csv_text(tmp_path, text, rating_scale=None)

    # Assert
    assert data.rating_scale == (0.5, 10.0)
    assert data.frame[RATING].tolist() == [0.5, 10.0]


def test_words_pandas_takes_for_missing_are_ids_in_an_id_column(tmp_path: Path) -> None:
    """Words such as "NA", "null", "None" and "nan" are plausible ids (a user's initials, a product code);
    only an empty field is a missing id. In the rating column they stay missing ratings."""
    data = _read_csv_text(tmp_path, HEADER + "NA,null,4\nNone,nan,3\nNA,nan,5\n")
    assert _rows(data) == {("NA", "null"): 4.0, ("None", "nan"): 3.0, ("NA", "nan"): 5.0}
    with pytest.raises(
        DataValidationError, match=r"row 2 \(line 3\), column 'rating': missing rating"
    ):
        _read_csv_text(tmp_path, HEADER + "NA,null,4\nNone,nan,NA\n")
    with pytest.raises(
        DataValidationError, match=r"row 2 \(line 3\), column 'item_id': missing id"
    ):
        _read_csv_text(tmp_path, HEADER + "NA,null,4\nNone,,3\n")


def test_a_row_short_of_fields_says_so_beside_the_problem_its_shift_makes(tmp_path: Path) -> None:
    """A line without its rating read the timestamp as the rating, and the message spoke of the
    rating scale alone."""
    text = "user_id,item_id,rating,timestamp\n1,10,4,881250949\n999,242,881250949\n"
    with pytest.raises(DataValidationError) as err:
        _read_csv_text(tmp_path, text)
    assert str(err.value).endswith(
        "row 2 (line 3), column 'rating': value 881250949.0 is outside the rating scale (its "
        "line has 3 of the header's 4 fields); allowed: a number in [1.0, 5.0] (rating_scale)"
    )
    with pytest.raises(DataValidationError) as err:  # a full row: no note
        _read_csv_text(tmp_path, "user_id,item_id,rating,timestamp\n1,10,9,881250949\n")
    assert str(err.value).endswith(
        "outside the rating scale; allowed: a number in [1.0, 5.0] (rating_scale)"
    )


def test_a_scale_taken_from_data_of_one_rating_value_is_refused(tmp_path: Path) -> None:
    """A scale (4.0, 4.0) trained a model that clipped every prediction to 4 (RMSE 0 against
    any champion) and that serving then refused."""
    with pytest.raises(DataValidationError) as err:
        _read_csv_text(tmp_path, HEADER + "1,10,4\n2,11,4\n", rating_scale=None)
    assert str(err.value).endswith(
        "column 'rating': value 4.0 is the only rating in the file, so no rating scale can be "
        "taken from the data; allowed: ratings of two or more values, or the scale given "
        "(--rating-scale LOW,HIGH, e.g. 1,5)"
    )
    given = _read_csv_text(tmp_path, HEADER + "1,10,4\n2,11,4\n", rating_scale=(1.0, 5.0))
    assert given.rating_scale == (1.0, 5.0)


@pytest.mark.parametrize(
    ("name", "delimiter"),
    [("r.csv", ","), ("r.tsv", "\t"), ("r.txt", ";"), ("r.csv", "|")],
)
def test_delimiter_is_sniffed(tmp_path: Path, name: str, delimiter: str) -> None:
    # Prepare
    rows = [["user_id", "item_id", "rating"], ["1", "10", "4"], ["2", "11", "2.5"]]
    path = tmp_path / name
    path.write_text("".join(delimiter.join(row) + "\n" for row in rows), encoding="utf-8")

    # Execute
    data = read_interactions(path)

    # Assert
    assert _rows(data) == {(1, 10): 4.0, (2, 11): 2.5}


def test_parquet_keeps_ids_as_given_and_reads_datetimes(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ratings.parquet"
    pd.DataFrame(
        {
            "user_id": ["007", "b"],
            "item_id": [5, 6],
            "rating": [4.0, 2.0],
            "timestamp": pd.to_datetime(["2000-01-01 00:00:00", "1970-01-01 00:01:00"]),
        }
    ).to_parquet(path)

    # Execute
    data = read_interactions(path)

    # Assert
    assert data.user_ids.tolist() == ["007", "b"]
    assert data.item_ids.tolist() == [5, 6]
    assert data.frame[TIMESTAMP].tolist() == [946684800, 60]


def test_validate_interactions_returns_the_internal_columns() -> None:
    # Prepare
    raw = pd.DataFrame({"u": [3, 1], "i": ["a ", "b"], "r": ["4", "2.5"], "t": [10, 20]})

    # Execute
    frame, notes = validate_interactions(
        raw,
        file="mem",
        user_col="u",
        item_col="i",
        rating_col="r",
        timestamp_col="t",
        rating_scale=(1.0, 5.0),
    )

    # Assert
    assert list(frame.columns) == [USER, ITEM, RATING, TIMESTAMP]
    assert frame[USER].tolist() == [3, 1]
    assert frame[ITEM].tolist() == ["a", "b"]
    assert frame[RATING].dtype == np.float64
    assert frame[RATING].tolist() == [4.0, 2.5]
    assert frame[TIMESTAMP].dtype == np.int64
    assert notes == ()


def test_the_earliest_bad_row_is_reported_across_kinds_of_problem() -> None:
    # Prepare: row 3 is not a number, but row 2 is out of range and comes first.
    raw = pd.DataFrame({"u": [1, 2, 3], "i": [1, 2, 3], "r": ["4", "9", "bad"]})

    # Execute
    with pytest.raises(DataValidationError) as caught:
        validate_interactions(
            raw,
            file="mem",
            user_col="u",
            item_col="i",
            rating_col="r",
            timestamp_col=None,
            rating_scale=(1.0, 5.0),
        )

    # Assert
    assert caught.value.row == 2
    assert caught.value.value == 9.0
    assert caught.value.column == "r"


def test_the_other_refused_rows_of_the_column_are_counted_so_a_file_is_fixed_in_one_go(
    tmp_path: Path,
) -> None:
    """The first bad row is named in full; every other row of its column that is refused, for
    any of the column's problems, is counted and the first three are named by row."""
    ratings = ["4", "9", "bad", "", "3", "inf", "0", "5"]  # rows 2, 3, 4, 6, 7 are refused
    path = tmp_path / "r.csv"
    path.write_text(HEADER + "".join(f"{i},{i},{r}\n" for i, r in enumerate(ratings)))

    with pytest.raises(DataValidationError) as caught:
        read_interactions(str(path), rating_scale=(1.0, 5.0))

    assert caught.value.row == 2 and caught.value.n_more == 4
    assert caught.value.more_rows == (3, 4, 6)
    assert str(caught.value) == (
        f"{path}, row 2 (line 3), column 'rating': value 9.0 is outside the rating scale; "
        "allowed: a number in [1.0, 5.0] (rating_scale); 4 more rows of this column are "
        "refused too (rows 3, 4, 6, ...)"
    )
    # one other: named alone; none: nothing added
    path.write_text(HEADER + "1,1,9\n2,2,4\n3,3,x\n")
    with pytest.raises(DataValidationError, match=r"; 1 more row of this column is refused "
                       r"too \(row 3\)$"):  # fmt: skip
        read_interactions(str(path), rating_scale=(1.0, 5.0))
    path.write_text(HEADER + "1,1,9\n2,2,4\n")
    with pytest.raises(DataValidationError, match=r"\(rating_scale\)$"):
        read_interactions(str(path), rating_scale=(1.0, 5.0))
    # ids: the missing ones are counted too
    path.write_text(HEADER + "1,,4\n2,2,4\n3,,4\n")
    with pytest.raises(DataValidationError, match=r"missing id; .*; 1 more row .*\(row 3\)$"):
        read_interactions(str(path), rating_scale=(1.0, 5.0))


def test_empty_frame_is_rejected_before_columns_are_checked() -> None:
    # Prepare
    raw = pd.DataFrame({"u": [], "i": []})

    # Execute
    with pytest.raises(DataValidationError) as caught:
        validate_interactions(
            raw,
            file="mem",
            user_col="u",
            item_col="i",
            rating_col=None,
            timestamp_col=None,
            rating_scale=None,
        )

    # Assert
    assert str(caught.value) == "mem: has no data rows; allowed: at least one interaction row"


def test_trailing_delimiters_are_not_columns_named_twice(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("user_id,item_id,rating,,\n1,10,4,,\n2,11,3,,\n")  # as spreadsheets export
    data = read_interactions(str(path))
    assert len(data) == 2 and data.n_users == 2


def _region_rows(n_users: int = 12, per_user: int = 4) -> list[str]:
    regions = ["north", "south", "NA", "east"]  # "NA" is North America, not a missing value
    return [
        f"u-{u:02d},sku{(u * 3 + j) % 20},{1 + (u + j) % 5},{regions[u % 4]}"
        for u in range(n_users)
        for j in range(per_user)
    ]


def test_a_user_level_column_becomes_each_users_feature(tmp_path: Path) -> None:
    path = tmp_path / "shop.csv"
    path.write_text("user_id,item_id,rating,region\n" + "\n".join(_region_rows()) + "\n")

    data = read_interactions(path, user_columns=("region",))

    expected = {f"u-{u:02d}": ["north", "south", "NA", "east"][u % 4] for u in range(12)}
    got = dict(zip(data.user_ids, data.user_features["region"], strict=True))
    assert got == expected
    assert "region" not in data.frame  # a user's value, not a row's


def test_a_user_level_column_in_parquet_keeps_its_type(tmp_path: Path) -> None:
    path = tmp_path / "shop.parquet"
    pd.DataFrame(
        {"user_id": [1, 1, 2, 3], "item_id": [5, 6, 5, 7], "rating": [4.0, 3, 5, 1],
         "store": [10, 10, 20, 10]}
    ).to_parquet(path)  # fmt: skip

    data = read_interactions(path, user_columns=("store",))

    assert data.user_features["store"].tolist() == [10, 20, 10]


@pytest.mark.parametrize(
    ("row", "cell", "expected"),
    [
        (6, "west", "row 6 (line 7), column 'region': value 'west' differs from 'south' on row 5, the first "
         "row of user 'u-01'; allowed: one value per user"),
        (3, " ", "row 3 (line 4), column 'region': missing value; allowed: one value per user"),
    ],
)  # fmt: skip
def test_a_user_level_column_that_varies_within_a_user_is_refused_at_its_row(
    tmp_path: Path, row: int, cell: str, expected: str
) -> None:
    rows = _region_rows()
    rows[row - 1] = rows[row - 1].rsplit(",", 1)[0] + "," + cell
    path = tmp_path / "shop.csv"
    path.write_text("user_id,item_id,rating,region\n" + "\n".join(rows) + "\n")

    with pytest.raises(DataValidationError) as caught:
        read_interactions(path, user_columns=("region",))

    assert str(caught.value).startswith(f"{path}, {expected}"), str(caught.value)


def test_split_files_give_every_user_their_value_and_refuse_two(tmp_path: Path) -> None:
    from models.data.sharding import combine_splits

    header = "user_id,item_id,rating,region\n"
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text(header + "a,1,4,north\na,2,5,north\nb,1,3,south\n")
    test.write_text(header + "a,3,4,north\nc,2,5,east\n")  # c: only in the held-out file

    data, _ = combine_splits(
        read_interactions(train, user_columns=("region",)),
        read_interactions(test, user_columns=("region",)),
    )

    got = dict(zip(data.user_ids, data.user_features["region"], strict=True))
    assert got == {"a": "north", "b": "south", "c": "east"}
    test.write_text(header + "a,3,4,west\n")
    with pytest.raises(DataValidationError, match=r"test\.csv, column 'region': value 'west' of "
                       r"user 'a' differs from 'north' in an earlier split file"):  # fmt: skip
        combine_splits(
            read_interactions(train, user_columns=("region",)),
            read_interactions(test, user_columns=("region",)),
        )


def test_integer_ids_split_the_same_from_csv_and_parquet(tmp_path: Path) -> None:
    from models.data.sharding import row_keys

    users = [9_223_372_036_854_775_807, 1_000_000_000_000_000_001, 42]  # 19 digits fit int64
    frame = pd.DataFrame({"user_id": users * 3, "item_id": [5, 6, 7] * 3,
                          "rating": [4.0] * 9})  # fmt: skip
    frame["item_id"] += np.repeat([0, 10, 20], 3)
    frame.to_csv(tmp_path / "r.csv", index=False)
    frame.to_parquet(tmp_path / "r.parquet")

    from_csv = read_interactions(tmp_path / "r.csv")
    from_parquet = read_interactions(tmp_path / "r.parquet")

    assert from_csv.user_ids.dtype == np.int64
    np.testing.assert_array_equal(row_keys(from_csv), row_keys(from_parquet))
    (tmp_path / "big.csv").write_text("user_id,item_id,rating\n9223372036854775808,1,4\n")
    assert read_interactions(tmp_path / "big.csv").user_ids.tolist() == ["9223372036854775808"]


def test_a_gzip_compressed_csv_reads_as_the_plain_file_and_its_errors_name_it(
    tmp_path: Path,
) -> None:
    import gzip

    text = "user_id\titem_id\trating\n" + "".join(
        f"u{u}\ti{(u * 7 + j) % 13}\t{1 + (u + j) % 5}\n" for u in range(20) for j in range(4)
    )
    (tmp_path / "r.tsv").write_text(text)
    (tmp_path / "r.TSV.gz").write_bytes(gzip.compress(text.encode()))

    plain = read_interactions(tmp_path / "r.tsv")
    packed = read_interactions(tmp_path / "r.TSV.gz")

    assert len(packed.frame) == len(plain.frame) == 80
    assert packed.fingerprint() == plain.fingerprint()
    # a bad row is named in the compressed file, by its data row
    bad = text.replace("u3\ti9\t5\n", "u3\ti9\t9\n")
    assert bad != text
    (tmp_path / "bad.csv.gz").write_bytes(gzip.compress(bad.replace("\t", ",").encode()))
    with pytest.raises(DataValidationError) as err:
        read_interactions(tmp_path / "bad.csv.gz")
    assert str(tmp_path / "bad.csv.gz") in str(err.value) and "row 14" in str(err.value)
    # a cut-off download is one line, not a traceback from gzip
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(text.encode())[:100])
    with pytest.raises(DataValidationError, match=r"cannot be decompressed.*gzip -t"):
        read_interactions(tmp_path / "cut.csv.gz")


def test_the_head_check_of_a_large_compressed_file_names_the_real_file(tmp_path: Path) -> None:
    import gzip

    from fedrec.inputs import _read_head

    data = tmp_path / "big.csv.gz"
    data.write_bytes(gzip.compress(b"user,item_id,rating\nu1,i1,4\n"))
    with pytest.raises(DataValidationError) as err:
        _read_head(data, {}, explicit=True)
    assert err.value.file == str(data) and err.value.column == "user_id"
    # a cut-off download is named as such, not as an empty file
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(gzip.compress(b"user_id,item_id,rating\n" + b"u1,i1,4\n" * 1000)[:60])
    with pytest.raises(DataValidationError, match=r"cut\.csv\.gz: cannot be decompressed"):
        _read_head(cut, {}, explicit=True)


def test_a_bad_rows_line_counts_the_header_blank_lines_and_quoted_line_breaks(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.csv"
    # line: 1 header, 2 u1, 3 spaces (no row), 4 u0, 5 blank, 6-7 u2 (a quoted break), 8 u3
    path.write_text('user_id,item_id,rating\nu1,i1,4\n   \nu0,i0,3\n\nu2,i2,"5\n"\nu3,i3,9\n')

    with pytest.raises(DataValidationError) as err:
        read_interactions(path)

    assert str(err.value).startswith(f"{path}, row 4 (line 8), column 'rating': value 9.0")
    assert (err.value.row, err.value.line) == (4, 8)
    # Parquet has rows, no lines
    pd.DataFrame(
        {"user_id": ["u1", "u3"], "item_id": ["i1", "i3"], "rating": [4.0, 9.0]}
    ).to_parquet(tmp_path / "r.parquet")
    with pytest.raises(DataValidationError, match=r"r\.parquet, row 2, column 'rating'"):
        read_interactions(tmp_path / "r.parquet")


def test_implicit_rows_rated_differently_are_said_to_count_alike(tmp_path: Path) -> None:
    from models.data.schema import every_row_positive

    rated = _read_csv_text(tmp_path, HEADER + "1,10,1\n1,11,4\n2,10,5\n")
    noted = every_row_positive(rated)
    assert noted.frame.equals(rated.frame)  # every row stays: the note only says so
    assert noted.notes[-1] == (
        "every row counts as a positive, whatever its rating (here 1 to 5); "
        "--positive-threshold T keeps only the rows rated >= T"
    )
    alike = _read_csv_text(tmp_path, HEADER + "1,10,5\n2,11,5\n")
    clicks = _read_csv_text(tmp_path, "user_id,item_id\n1,10\n1,11\n")  # no rating column
    for data in (alike, clicks):
        assert every_row_positive(data).notes == data.notes
