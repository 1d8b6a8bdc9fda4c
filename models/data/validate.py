"""Check a raw interaction table once, at the boundary, and return it in the internal columns.

Every check is a vectorised mask over the whole column, so a million rows validate in a fraction
of a second; only the first offending row is turned into a message.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

import numpy as np
import pandas as pd

from models.data.errors import DataValidationError, NoDataRows
from models.data.schema import ITEM, RATING, TIMESTAMP, USER

_EPOCH = pd.Timestamp(0, tz="UTC")
# Largest timestamp accepted: beyond this a float cannot hold every integer second exactly.
_MAX_TIMESTAMP = 2**53
# 3000-01-01 in Unix seconds: a later one is milliseconds (or finer) since 1970, taken for seconds
_YEAR_3000 = 32_503_680_000


MAX_AGE = 150
# the columns that describe a user to the two-stage model's re-ranker, in requests and in data
USER_SIDE_FEATURES = ("age", "gender", "occupation")
# those the re-ranker reads as a number or a code, and what it can read: another value would be
# taken as unknown without a word (an empty cell is unknown); an occupation is any text
USER_FEATURE_VALUES = {
    "age": f"a number of years in [0, {MAX_AGE}], or an empty cell (unknown)",
    "gender": "M or F (either case), or an empty cell (unknown)",
}
# the problem a rating off the scale is refused with (the command line adds how to set the scale)
OUTSIDE_SCALE = "is outside the rating scale"


def user_feature_known(column: str, value: object) -> bool:
    """Whether the re-ranker reads ``value`` of ``column`` (age or gender) as something it
    knows; an empty cell (None, NaN, blank text) is unknown, not an error."""
    if column == "gender":
        return str(value).strip().upper() in ("M", "F")
    try:
        age = float(str(value).strip())
    except ValueError:
        return False
    return 0 <= age <= MAX_AGE  # NaN and infinities too are outside


def is_blank(value: object) -> bool:
    """An empty cell: a missing value, or text of spaces only."""
    return value is None or bool(pd.isna(value)) or not str(value).strip()


def validate_interactions(
    raw: pd.DataFrame,
    *,
    file: str,
    user_col: str,
    item_col: str,
    rating_col: str | None,
    timestamp_col: str | None,
    rating_scale: tuple[float, float] | None,
    user_cols: tuple[str, ...] = (),
    side_cols: tuple[str, ...] = (),
    repeats: Literal["latest", "sum"] = "latest",
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Validate raw interaction rows and return them in the internal column layout.

    Parameters
    ----------
    raw : DataFrame
        One row per interaction, as read from ``file``; the row order is the file's data-row
        order (row 1 is the first row after any header).
    file : str
        Name used in error messages and notes.
    user_col, item_col : str
        Columns holding the caller's user and item ids (strings or integers).
    rating_col : str or None
        Column of explicit ratings; ``None`` means implicit feedback (every rating is 1.0).
    timestamp_col : str or None
        Column of Unix seconds (integers) or ISO-8601 strings (naive ones are taken as UTC);
        ``None`` when the data has no time.
    rating_scale : tuple of float or None
        Inclusive ``(min, max)`` that every rating must lie in; ``None`` skips the range check.
    user_cols : tuple of str
        Columns that describe the user, not the row (a shop's region, a site): every row of a
        user must hold the same value.
    side_cols : tuple of str
        Of :data:`USER_SIDE_FEATURES`, columns that describe the user to the re-ranker: an
        empty cell is unknown, the other cells of a user hold one value, and an age or gender
        is one the re-ranker reads (:data:`USER_FEATURE_VALUES`).
    repeats : {"latest", "sum"}
        Rows of the same (user, item): the latest one stands (a changed rating), or one row, the
        latest, stands with the sum of their ratings (repeat purchases or plays counted; each
        row counts 1 without a rating column).

    Returns
    -------
    frame : DataFrame
        Columns ``user`` and ``item`` (the caller's ids; strings have surrounding whitespace
        removed), ``rating`` (float64), when ``timestamp_col`` is given ``timestamp`` (int64
        Unix seconds), ``user_cols`` as given (strings stripped) and ``side_cols`` (an age as
        a float, blanks as missing). Duplicate (user, item)
        rows are reduced to the latest one (as ``repeats`` says).
    notes : tuple of str
        Human-readable remarks about what was changed, such as dropped duplicates.

    Raises
    ------
    DataValidationError
        For the first problem found: no data rows, a missing column, a missing or empty id, a
        rating that is missing, not a number or outside ``rating_scale``, or a timestamp that is
        missing, unparseable or negative. The message names the file, the 1-based data row,
        the column, the value and what is allowed.
    """
    _check_rating_scale(rating_scale, file=file)
    if len(raw) == 0:
        raise NoDataRows("has no data rows", file=file, allowed="at least one interaction row")
    wanted = [user_col, item_col, rating_col, timestamp_col]
    for column in wanted:
        if column is not None:
            require_column(raw, column, file=file)

    _refuse_repeated_header(raw, [c for c in wanted if c is not None], file=file)
    frame = pd.DataFrame(
        {
            USER: _clean_ids(raw[user_col], file=file, column=user_col),
            ITEM: _clean_ids(raw[item_col], file=file, column=item_col),
        }
    )
    if rating_col is None:
        frame[RATING] = np.ones(len(raw), dtype=np.float64)
    else:
        frame[RATING] = _clean_ratings(
            raw[rating_col], file=file, column=rating_col, rating_scale=rating_scale
        )
    if timestamp_col is not None:
        frame[TIMESTAMP] = _clean_timestamps(raw[timestamp_col], file=file, column=timestamp_col)
    for column in user_cols:
        require_column(raw, column, file=file)
        frame[column] = _user_level(raw[column], frame[USER], file=file, column=column)
    for column in side_cols:
        frame[column] = _user_side_feature(raw[column], frame[USER], file=file, column=column)
    return _drop_duplicates(frame, repeats=repeats)


def _user_side_feature(series: pd.Series, users: pd.Series, *, file: str, column: str) -> pd.Series:
    """An age, gender or occupation column: blank cells are unknown; each cell with a value is
    one the re-ranker reads, and every such cell of a user holds the same value."""
    series = series.reset_index(drop=True)
    if pd.api.types.infer_dtype(series, skipna=True) in ("string", "mixed", "mixed-integer"):
        series = series.astype(object).where(series.isna(), series.astype(str).str.strip())
        series = series.mask(series.eq(""))
    allowed = USER_FEATURE_VALUES.get(column, "one value per user, or an empty cell (unknown)")
    if column in USER_FEATURE_VALUES:
        refused = [v for v in series.dropna().unique()  # each distinct value once
                   if not (is_blank(v) or user_feature_known(column, v))]  # fmt: skip
        _fail_first(series.isin(refused).to_numpy(), series, f"is not a valid {column}",
                    file=file, column=column, allowed=allowed)  # fmt: skip
    if column == "age":
        series = pd.to_numeric(series, errors="coerce").astype(np.float64)
    elif column == "gender":
        series = series.astype(object).where(series.isna(), series.astype(str).str.upper())
    found = _first_disagreement(series, users)
    if found is not None:
        at, was = found
        raise DataValidationError(
            f"differs from {python_value(series.iloc[was])!r} on row {was + 1} (user "
            f"{python_value(users.iloc[at])!r})",
            file=file, row=at + 1, column=column, value=python_value(series.iloc[at]),
            allowed=f"one {column} per user (empty cells are unknown)",
        )  # fmt: skip
    return series


def _user_level(series: pd.Series, users: pd.Series, *, file: str, column: str) -> pd.Series:
    """A column that describes the user: present on every row, one value per user."""
    allowed = "one value per user, on every row of that user (a column that describes the user)"
    series = series.reset_index(drop=True)
    kind = pd.api.types.infer_dtype(series, skipna=True)
    if kind == "string":
        series = series.str.strip()
        series = series.mask(series.eq(""))
    elif kind in ("mixed", "mixed-integer"):  # text beside numbers: strip the text only
        series = series.map(lambda value: value.strip() if isinstance(value, str) else value)
        series = series.mask(series.eq(""))
    _fail_first(series.isna().to_numpy(), series, "missing value", file=file, column=column,
                allowed=allowed)  # fmt: skip
    found = _first_disagreement(series, users)
    if found is not None:
        at, first = found
        raise DataValidationError(
            f"differs from {python_value(series.iloc[first])!r} on row {first + 1}, the first "
            f"row of user {python_value(users.iloc[at])!r}",
            file=file, row=at + 1, column=column, value=python_value(series.iloc[at]),
            allowed=allowed,
        )  # fmt: skip
    return series


def _first_disagreement(series: pd.Series, users: pd.Series) -> tuple[int, int] | None:
    """The first row (0-based) whose value differs from the first value its user has, and
    that first row; rows without a value are skipped. None when each user has one value."""
    rows = np.flatnonzero(series.notna().to_numpy())
    codes, _ = pd.factorize(users)
    first = pd.Series(rows).groupby(codes[rows]).transform("min").to_numpy()
    values = series.iloc[rows].reset_index(drop=True)
    differs = values.ne(series.iloc[first].reset_index(drop=True)).to_numpy()
    bad = np.flatnonzero(differs)
    return None if bad.size == 0 else (int(rows[bad[0]]), int(first[bad[0]]))


def _refuse_repeated_header(raw: pd.DataFrame, columns: list[str], *, file: str) -> None:
    """A data row that names the columns it lies in: the header again, as files joined with
    their headers (``cat a.csv b.csv``) have. Said as such, not as a rating that is no number."""
    text = [pd.api.types.is_object_dtype(raw[c]) or pd.api.types.is_string_dtype(raw[c])
            for c in columns]  # fmt: skip
    if not all(text):
        return  # a typed column (Parquet, or parsed numbers) holds no header text
    same = np.ones(len(raw), dtype=bool)
    for column in columns:
        values = raw[column].astype("string").str.strip()
        same &= values.eq(column).fillna(False).to_numpy(dtype=bool)
    if same.any():
        raise DataValidationError(
            "repeats the header (files joined with their headers?)",
            file=file, row=int(np.flatnonzero(same)[0]) + 1, allowed="one header line, the first",
        )  # fmt: skip


def _check_rating_scale(rating_scale: tuple[float, float] | None, *, file: str) -> None:
    if rating_scale is None:
        return
    low, high = (float(bound) for bound in rating_scale)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise DataValidationError(
            "is not a valid range",
            file=file,
            setting="rating_scale",
            value=rating_scale,
            allowed="(min, max) with finite min < max",
        )


def require_column(raw: pd.DataFrame, column: str, *, file: str) -> None:
    """Refuse ``raw`` without ``column`` in one line, suggesting the closest column present."""
    names = [str(name) for name in raw.columns]
    if column in raw.columns:
        return
    close = difflib.get_close_matches(column, names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if len(names) == 1 and column in names[0]:  # "user_id item_id rating": another delimiter
        hint = (
            " (the header reads as one column: fields are separated by a comma, tab, ';' or "
            "'|', and this file uses none of them)"
        )
    present = ", ".join(repr(name) for name in names)
    raise DataValidationError(
        f"column not found{hint}",
        file=file,
        column=column,
        allowed=f"one of the columns present: {present}",
    )


def python_value(value: Any) -> Any:
    """A numpy scalar as the plain Python value, so messages read ``6.0``, not ``np.float64(6.0)``."""
    return value.item() if isinstance(value, np.generic) else value


MORE_ROWS_SHOWN = 3


def _fail_first(
    mask: np.ndarray,
    values: pd.Series,
    problem: str,
    *,
    file: str,
    column: str,
    allowed: str,
    refused: np.ndarray | None = None,
) -> None:
    """Raise for the first True in ``mask``, quoting that row of ``values``, with how many other
    rows of the column are refused (``refused``: every problem of the column; default ``mask``)
    and the first few of them; do nothing if none."""
    bad = np.flatnonzero(mask)
    if bad.size == 0:
        return
    position = int(bad[0])
    others = np.flatnonzero(mask if refused is None else refused)
    others = others[others != position]
    value = python_value(values.iloc[position])
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        # A missing cell has no value worth quoting; the problem text says it is missing.
        value = None
    raise DataValidationError(
        problem, file=file, row=position + 1, column=column, value=value, allowed=allowed,
        more_rows=tuple(int(r) + 1 for r in others[:MORE_ROWS_SHOWN]), n_more=int(others.size),
    )  # fmt: skip


def _wrong_type(series: pd.Series, *, file: str, column: str, allowed: str) -> DataValidationError:
    """A column whose type (a Parquet file's) cannot hold what it should: named by its type."""
    return DataValidationError(
        f"has type {series.dtype.name}", file=file, column=column, allowed=allowed
    )


def _is_scalar_id(value: object) -> bool:
    return isinstance(value, str | int | float | np.integer | np.floating) and not isinstance(
        value, bool
    )


def _clean_ids(series: pd.Series, *, file: str, column: str) -> pd.Series:
    allowed = "a non-empty string or integer id"
    series = series.reset_index(drop=True)
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(series.cat.categories.dtype)
    missing = series.isna().to_numpy()
    _fail_first(missing, series, "missing id", file=file, column=column, allowed=allowed)
    if pd.api.types.is_bool_dtype(series.dtype):
        raise _wrong_type(series, file=file, column=column, allowed=allowed)
    if pd.api.types.is_float_dtype(series.dtype):
        # Float ids are integer ids that passed through a NaN-able column; give them back.
        values = series.to_numpy()
        fractional = np.isinf(values) | (values != np.floor(values))
        _fail_first(
            fractional, series, "is not a whole number", file=file, column=column, allowed=allowed
        )
        return series.astype(np.int64)
    if pd.api.types.is_integer_dtype(series.dtype):
        return series.astype(np.int64)
    kind = pd.api.types.infer_dtype(series, skipna=False)
    if kind == "integer":
        return series.astype(np.int64)
    if kind == "string":
        stripped = series.astype("str").str.strip()
    else:
        # a Parquet column can hold lists, bytes or records, which no id can be
        scalar = series.map(_is_scalar_id).to_numpy(dtype=bool)
        _fail_first(
            ~scalar, series, "is neither text nor a number", file=file, column=column,
            allowed=allowed,
        )  # fmt: skip
        # Mixed ids: strip the strings, keep everything else exactly as given.
        as_text = series.astype(object).str.strip()
        stripped = as_text.where(as_text.notna(), series.astype(object))
    empty = stripped.eq("").to_numpy(dtype=bool, na_value=False)
    _fail_first(
        empty,
        series,
        "is an empty or whitespace-only id",
        file=file,
        column=column,
        allowed=allowed,
    )
    return stripped


def _clean_ratings(
    series: pd.Series, *, file: str, column: str, rating_scale: tuple[float, float] | None
) -> np.ndarray:
    series = series.reset_index(drop=True)
    number = "a number"
    if (
        pd.api.types.is_bool_dtype(series.dtype)
        or pd.api.types.is_datetime64_any_dtype(series.dtype)
        or pd.api.types.is_timedelta64_dtype(series.dtype)
    ):  # numbers underneath, but not ratings: refused by type, not by a converted value
        raise _wrong_type(series, file=file, column=column, allowed=number)
    if pd.api.types.is_numeric_dtype(series.dtype):
        # A copy, so the clean frame never shares (read-only) memory with the caller's frame.
        values = series.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        not_numeric = np.zeros(len(series), dtype=bool)
    else:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        not_numeric = np.isnan(values) & series.notna().to_numpy()
    missing = series.isna().to_numpy()
    not_finite = np.isinf(values)
    if rating_scale is None:
        outside = np.zeros(len(series), dtype=bool)
        range_text = "a finite number"
    else:
        low, high = float(rating_scale[0]), float(rating_scale[1])
        with np.errstate(invalid="ignore"):
            outside = (values < low) | (values > high)
        range_text = f"a number in [{low}, {high}] (rating_scale)"
    # Report whichever problem comes first in the file, not whichever check runs first.
    problems = [
        (not_numeric, series, "is not a number"),
        (missing, series, "missing rating"),
        (not_finite | outside, pd.Series(values), OUTSIDE_SCALE),
    ]
    _fail_earliest(problems, file=file, column=column, allowed=range_text)
    return values


def _fail_earliest(
    problems: list[tuple[np.ndarray, pd.Series, str]], *, file: str, column: str, allowed: str
) -> None:
    firsts = [
        (int(np.argmax(mask)), mask, values, text) for mask, values, text in problems if mask.any()
    ]
    if firsts:
        _, mask, values, text = min(firsts, key=lambda first: first[0])
        refused = np.logical_or.reduce([mask for mask, _, _ in problems])
        _fail_first(mask, values, text, file=file, column=column, allowed=allowed, refused=refused)


def _clean_timestamps(series: pd.Series, *, file: str, column: str) -> np.ndarray:
    allowed = "integer Unix seconds >= 0, or an ISO-8601 date-time from 1970 on"
    series = series.reset_index(drop=True)
    missing = series.isna().to_numpy()
    if isinstance(series.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(
        series.dtype
    ):
        seconds = _datetimes_to_seconds(series)
        unparseable = np.zeros(len(series), dtype=bool)
    elif pd.api.types.is_bool_dtype(series.dtype):
        raise _wrong_type(series, file=file, column=column, allowed=allowed)
    elif pd.api.types.is_numeric_dtype(series.dtype):
        seconds = series.to_numpy(dtype=np.float64, na_value=np.nan)
        unparseable = np.zeros(len(series), dtype=bool)
    else:
        # A writable copy: the ISO strings are filled in below.
        seconds = np.array(
            pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        )
        # Whatever is not a number must be an ISO-8601 string; anything else is rejected.
        is_text = np.isnan(seconds) & ~missing
        if is_text.any():
            parsed = pd.to_datetime(
                series[is_text].astype("str"), format="ISO8601", errors="coerce", utc=True
            )
            seconds[is_text] = _datetimes_to_seconds(parsed)
        unparseable = np.isnan(seconds) & ~missing
    with np.errstate(invalid="ignore"):
        not_whole = np.isfinite(seconds) & (seconds != np.floor(seconds))
        out_of_range = np.isinf(seconds) | (seconds < 0) | (seconds > _MAX_TIMESTAMP)
        too_late = ~out_of_range & (seconds >= _YEAR_3000)
    problems = [
        (missing, series, "missing timestamp"),
        (unparseable, series, "is not a timestamp"),
        (not_whole, series, "is not a whole number of seconds"),
        (out_of_range, series, "is out of range"),
        (too_late, series, "is after the year 3000 as seconds: milliseconds since 1970? (divide "
         "by 1000)"),
    ]  # fmt: skip
    _fail_earliest(problems, file=file, column=column, allowed=allowed)
    return seconds.astype(np.int64)


def _datetimes_to_seconds(series: pd.Series) -> np.ndarray:
    if not isinstance(series.dtype, pd.DatetimeTZDtype):
        # Naive date-times carry no zone; read them as UTC, as the docstring promises.
        series = series.dt.tz_localize("UTC")
    delta = (series - _EPOCH) / pd.Timedelta(1, "s")
    return delta.to_numpy(dtype=np.float64, na_value=np.nan)


def _drop_duplicates(
    frame: pd.DataFrame, *, repeats: Literal["latest", "sum"] = "latest"
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Keep the latest row of each (user, item): by timestamp when there is one, else the last;
    with ``repeats="sum"`` it carries the sum of the pair's ratings."""
    # One int64 key per pair: hashing a single integer column is several times cheaper than
    # asking pandas for duplicates over two (possibly string) columns, twice.
    user_codes, _ = pd.factorize(frame[USER])
    item_codes, item_uniques = pd.factorize(frame[ITEM])
    pair = pd.Series(user_codes.astype(np.int64) * len(item_uniques) + item_codes)
    duplicated = pair.duplicated(keep="last").to_numpy()
    n_dropped = int(duplicated.sum())
    if n_dropped == 0:
        return frame, ()
    if TIMESTAMP in frame:
        # A stable sort by time keeps file order among equal timestamps, so ties go to the last row.
        order = np.argsort(frame[TIMESTAMP].to_numpy(), kind="stable")
        later = pair.iloc[order].duplicated(keep="last").to_numpy()
        keep = np.sort(order[~later])
        how = "by timestamp"
    else:
        keep = np.flatnonzero(~duplicated)
        how = "the last in file order"
    if repeats == "sum":
        totals = frame[RATING].groupby(pair.to_numpy()).sum()
        frame = frame.iloc[keep].reset_index(drop=True)
        frame[RATING] = totals.loc[pair.to_numpy()[keep]].to_numpy()
        note = (
            f"added {n_dropped} repeated (user, item) rows to the latest of each ({how}): "
            "its rating is the pair's sum"
        )
        return frame, (note,)
    frame = frame.iloc[keep].reset_index(drop=True)
    note = f"dropped {n_dropped} duplicate (user, item) rows, kept the latest of each ({how})"
    return frame, (note,)
