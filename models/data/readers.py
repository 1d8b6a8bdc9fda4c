"""Read interaction files (CSV, Parquet) into validated, encoded ``Interactions``; load datasets.

MovieLens folders are read by ``movielens.py``; ``load_dataset`` dispatches to it.

Every problem with an input surfaces as one ``DataValidationError`` line naming the file; the
checks on the rows themselves live in ``validate.py``.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from models.data.errors import DataValidationError, reencoding_advice
from models.data.movielens import (
    NAMED_DATASETS,
    RATING_FILE_SUFFIXES,
    read_movielens_1m,
    read_movielens_100k,
    read_movielens_ratings,
)
from models.data.schema import ITEM, RATING, USER, Interactions, encode_interactions
from models.data.synthetic import generate_synthetic
from models.data.tables import parse_error
from models.data.validate import validate_interactions

DATASETS_ENV = "FEDREC_DATASETS"
# delimited text, plain or gzip-compressed (read whole, as a plain file is)
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_SUFFIXES = CSV_SUFFIXES + PARQUET_SUFFIXES
DEFAULT_RATING_COL = "rating"
DEFAULT_TIMESTAMP_COL = "timestamp"

_DELIMITERS = (",", "\t", ";", "|")
# Ids written as canonical integers ("42", not "007" or "4.0") become int64, as a Parquet file's
# integer ids are, so that both give a row the same split; 19 digits fit unless past int64.
_CANONICAL_INT = r"-?(?:0|[1-9][0-9]{0,18})"


def has_suffix(path: str | Path, suffixes: tuple[str, ...]) -> bool:
    """Whether the file's name ends with one of ``suffixes`` (case-insensitive; ``.csv.gz``
    is one suffix)."""
    return Path(path).name.lower().endswith(suffixes)


def datasets_dir() -> Path:
    """The folder holding shared datasets such as ``ml-100k/`` and ``ml-1m/``.

    Returns
    -------
    Path
        ``$FEDREC_DATASETS`` when set, else ``<repo root>/../shared/datasets``, where the repo
        root is the folder that contains ``models/``.
    """
    configured = os.environ.get(DATASETS_ENV)
    if configured:
        return Path(configured).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "datasets"


def _check_one_column_per_role(file: str, **roles: str | None) -> None:
    """Refuse one column named for two roles (``user_col`` and ``item_col`` both ``item_id``):
    read twice, it would make every row a user's only item, or its time its user."""
    seen: dict[str, str] = {}
    for setting, column in roles.items():
        if column is None:
            continue
        if column in seen:
            raise DataValidationError(
                f"is named by {seen[column]} too: one column cannot hold two of the user, item, "
                "rating and timestamp",
                file=file, setting=setting, value=column,
                allowed="a different column for each of user_col, item_col, rating_col and "
                "timestamp_col (--user-col, --item-col, --rating-col, --timestamp-col)",
            )  # fmt: skip
        seen[column] = setting


def read_interactions(
    path: str | os.PathLike[str],
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str | None = DEFAULT_RATING_COL,
    timestamp_col: str | None = DEFAULT_TIMESTAMP_COL,
    rating_scale: tuple[float, float] | None = (1.0, 5.0),
    user_columns: tuple[str, ...] = (),
    side_columns: tuple[str, ...] = (),
    repeats: Literal["latest", "sum"] = "latest",
) -> Interactions:
    """Read a CSV or Parquet file of interactions, validate it and encode its ids.

    Parameters
    ----------
    path : str or PathLike
        A ``.csv``, ``.tsv`` or ``.txt`` file with a header row (UTF-8; the delimiter is sniffed
        among ``,``, tab, ``;`` and ``|``), or a ``.parquet``/``.pq`` file.
    user_col, item_col : str
        Columns holding user and item ids. CSV ids are read as text, so ``"007"`` stays
        ``"007"``; a column whose ids are all canonical integers becomes int64.
    rating_col : str or None
        Column of explicit ratings. ``None``, or the default name when the file has no such
        column, means implicit feedback: every rating is 1.0 and ``rating_scale`` is ``None``.
    timestamp_col : str or None
        Column of Unix seconds or ISO-8601 strings; the default name may be absent.
    rating_scale : tuple of float or None
        Inclusive (min, max) of ratings. ``None`` with explicit ratings takes the scale from
        the data (noted in ``Interactions.notes``).
    user_columns : tuple of str
        Columns that describe the user (a region, a site; every row of a user holds the same
        value, read as text in a CSV file), kept as ``Interactions.user_features``: what a
        ``by-key`` partition reads.
    side_columns : tuple of str
        Columns of :data:`~models.data.validate.USER_SIDE_FEATURES` to keep where the file has
        them (the re-ranker's age, gender and occupation), also in ``Interactions.user_features``:
        checked as ``validate_interactions`` says, and named in a note.
    repeats : {"latest", "sum"}
        Rows of the same (user, item): the latest stands, or the latest with the sum of their
        ratings (``validate_interactions``).

    Returns
    -------
    Interactions

    Raises
    ------
    DataValidationError
        When the file is missing, a directory, empty, of an unsupported type, not UTF-8, not
        readable as Parquet, lacks a column asked for, or holds a bad row (see
        ``validate_interactions``).
    """
    path = Path(path)
    file = str(path)
    _check_is_file(path, suffixes=TABLE_SUFFIXES)
    is_parquet = has_suffix(path, PARQUET_SUFFIXES)
    text_cols = (user_col, item_col, *user_columns)
    raw = _read_parquet(path) if is_parquet else read_delimited(path, text_cols)
    taken = {user_col, item_col, rating_col, timestamp_col, *user_columns}
    sides = tuple(c for c in side_columns if c in raw.columns and c not in taken)

    notes: list[str] = []
    if rating_col is None:
        rating_scale = None
    elif rating_col == DEFAULT_RATING_COL and rating_col not in raw.columns:
        rating_col, rating_scale = None, None
        notes.append(f"no {DEFAULT_RATING_COL!r} column: implicit feedback, every rating is 1.0")
    if timestamp_col == DEFAULT_TIMESTAMP_COL and timestamp_col not in raw.columns:
        timestamp_col = None
        notes.append(f"no {DEFAULT_TIMESTAMP_COL!r} column: the rows carry no time")
    _check_one_column_per_role(
        file, user_col=user_col, item_col=item_col, rating_col=rating_col,
        timestamp_col=timestamp_col,
    )  # fmt: skip

    try:
        frame, validation_notes = validate_interactions(
            raw,
            file=file,
            user_col=user_col,
            item_col=item_col,
            rating_col=rating_col,
            timestamp_col=timestamp_col,
            rating_scale=rating_scale,
            user_cols=tuple(user_columns),
            side_cols=sides,
            repeats=repeats,
        )
    except DataValidationError as err:
        if is_parquet or err.row is None or err.line is not None or err.file != file:
            raise
        found = locate_row(path, err.row)
        if found is None:
            raise
        line, fields, header = found
        short = f"its line has {fields} of the header's {header} fields" if fields < header else ""
        raise err.at_line(line, short) from err.__cause__
    notes.extend(validation_notes)
    if not is_parquet:
        frame[USER] = integer_ids(frame[USER])
        frame[ITEM] = integer_ids(frame[ITEM])
    user_features = None
    if user_columns or sides:  # first() takes each user's first value that is there
        user_features = frame.groupby(USER, sort=False)[[*user_columns, *sides]].first()
        frame = frame.drop(columns=[*user_columns, *sides])
    if sides:
        known = user_features[list(sides)].notna().any(axis=1).sum()
        notes.append(f"user features for the re-ranker: {', '.join(sides)} ({known} of "
                     f"{len(user_features)} users with one or more)")  # fmt: skip
    if rating_col is not None and rating_scale is None:
        ratings = frame[RATING].to_numpy()
        rating_scale = (float(ratings.min()), float(ratings.max()))
        if rating_scale[0] == rating_scale[1]:  # a scale of one value: nothing to learn or clip to
            raise DataValidationError(
                "is the only rating in the file, so no rating scale can be taken from the data",
                file=file, column=rating_col, value=rating_scale[0],
                allowed="ratings of two or more values, or the scale given (--rating-scale "
                "LOW,HIGH, e.g. 1,5)",
            )  # fmt: skip
        notes.append(f"rating scale {rating_scale}, taken from the data")
    return encode_interactions(
        frame, rating_scale=rating_scale, source=file, notes=tuple(notes),
        user_features=user_features,
    )  # fmt: skip


def load_dataset(spec: str, **kw: object) -> Interactions:
    """Load a dataset named by a short spec.

    Parameters
    ----------
    spec : str
        ``"synthetic"`` (``generate_synthetic`` with ``kw``); ``"ml-100k"`` or ``"ml-1m"``
        (looked up under ``datasets_dir()`` unless such a path exists); a MovieLens folder
        (recognised by ``u.data`` or ``ratings.dat``); or an interaction file.
    **kw
        For a file, the options of ``read_interactions``; for ``"synthetic"``, those of
        ``generate_synthetic``. MovieLens folders take none.

    Returns
    -------
    Interactions

    Raises
    ------
    DataValidationError
        When the spec names nothing loadable, or the data itself is bad.
    """
    if spec == "synthetic":
        try:
            return _synthetic(tuple(sorted(kw.items())))
        except TypeError:  # an unhashable option: generated without the memo
            return generate_synthetic(**kw)  # type: ignore[arg-type]
    path = Path(spec).expanduser()
    if not path.exists() and spec in NAMED_DATASETS:
        path = datasets_dir() / spec
        if not path.is_dir():
            raise DataValidationError(
                f"dataset {spec!r} not found",
                file=str(path),
                allowed=f"a folder {spec}/ under ${DATASETS_ENV} (default ../shared/datasets)",
            )
    if path.is_dir():
        if kw:
            raise DataValidationError(
                f"options {sorted(kw)} do not apply to a MovieLens folder", file=str(path)
            )
        if (path / "u.data").is_file():
            return read_movielens_100k(path)
        if (path / "ratings.dat").is_file():
            return read_movielens_1m(path)
        raise DataValidationError(
            "folder holds neither u.data nor ratings.dat",
            file=str(path),
            allowed="a MovieLens 100K (u.data) or 1M (ratings.dat) folder",
        )
    if path.is_file() and path.suffix in RATING_FILE_SUFFIXES and not kw:
        return read_movielens_ratings(path)
    if path.is_file():
        return read_interactions(path, **kw)  # type: ignore[arg-type]
    raise DataValidationError(
        f"unknown dataset {spec!r}: no such file or folder",
        allowed="'synthetic', 'ml-100k', 'ml-1m', a MovieLens folder, or a "
        + "/".join(TABLE_SUFFIXES)
        + " file",
    )


@functools.lru_cache(maxsize=1)
def _synthetic(options: tuple[tuple[str, object], ...]) -> Interactions:
    """The synthetic data of ``options``, the last set asked remembered: the command line's
    pre-check and the flow it starts then generate it once (``Interactions`` is immutable)."""
    return generate_synthetic(**dict(options))  # type: ignore[arg-type]


def _check_is_file(path: Path, *, suffixes: tuple[str, ...]) -> None:
    file = str(path)
    if not path.exists():
        raise DataValidationError("no such file", file=file, allowed="an existing file")
    if path.is_dir():
        raise DataValidationError(
            "is a directory", file=file, allowed=f"a file ({', '.join(suffixes)})"
        )
    if not has_suffix(path, suffixes):
        raise DataValidationError(
            f"unsupported file type {path.suffix or '(no extension)'!r}",
            file=file,
            allowed=", ".join(suffixes),
        )
    if path.stat().st_size == 0:
        raise DataValidationError("is empty (0 bytes)", file=file, allowed="a header and data rows")


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise DataValidationError(
            f"is not a readable Parquet file ({reason})",
            file=str(path),
            allowed="a Parquet file, e.g. written by DataFrame.to_parquet",
        ) from err


def read_item_list(path: str | os.PathLike[str], item_col: str = "item_id") -> pd.Index:
    """A published item list: the ``item_col`` column of a CSV file (the data's item column:
    a shop's product list names its ids as its interactions do), else its ``item_id`` column
    (other columns ignored), as the ids' text, stripped, in the file's order.

    Raises
    ------
    DataValidationError
        Naming the file, and the row and column of an empty id.
    """
    path = Path(path)
    _check_is_file(path, suffixes=CSV_SUFFIXES)
    raw = read_delimited(path, (item_col, "item_id"))
    if item_col not in raw.columns and "item_id" in raw.columns:
        item_col = "item_id"
    if item_col not in raw.columns:
        raise DataValidationError(
            f"has no {item_col!r} column (found {list(raw.columns)})",
            file=str(path),
            allowed=f"a CSV file with an {item_col} column"
            + ("" if item_col == "item_id" else " (the data's --item-col) or an item_id column"),
        )
    ids = raw[item_col].fillna("").astype(str).str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if empty.size:
        raise DataValidationError(
            "is empty", file=str(path), row=int(empty[0]) + 1, column=item_col, value="",
            allowed="an item id",
        )  # fmt: skip
    if ids.empty:
        raise DataValidationError("lists no item", file=str(path), allowed="one item id per row")
    return pd.Index(ids.to_numpy(), dtype=object)


# what pandas reads as a missing value by default (``keep_default_na``), kept for non-id columns
_MISSING_WORDS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                  "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]  # fmt: skip


def _not_decompressed(file: str, err: Exception) -> DataValidationError:
    return DataValidationError(
        f"cannot be decompressed ({err})",
        file=file,
        allowed="a whole gzip file (gzip -t checks one), or the file without .gz",
    )


def read_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a delimited file's text (decompressed for a ``.gz`` one).

    Raises
    ------
    DataValidationError
        A ``.gz`` file that cannot be decompressed that far.
    """
    if not has_suffix(path, (".gz",)):
        with open(path, "rb") as handle:
            return handle.read(size)
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read(size)
    except (OSError, EOFError, zlib.error) as err:
        raise _not_decompressed(str(path), err) from err


def read_delimited(path: Path, id_cols: tuple[str, ...]) -> pd.DataFrame:
    """A delimited text file (``.gz``: decompressed) as a table: the delimiter sniffed from the
    header (comma, semicolon or tab; a ``.tsv`` file's default is tab), spaces around the
    header's names dropped, the ``id_cols`` read as text with only an empty field missing.

    Raises
    ------
    DataValidationError
        A file that is blank, not UTF-8, not parseable, or names a column twice.
    """
    data = path.read_bytes()
    file = str(path)
    if has_suffix(path, (".gz",)):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise _not_decompressed(file, err) from err
    if not data.strip():
        raise DataValidationError(
            "is empty (only blank lines)", file=file, allowed="a header and data rows"
        )
    # The header is sniffed before the file is known to be UTF-8; latin-1 decodes any byte.
    header = data.split(b"\n", 1)[0].removeprefix(b"\xef\xbb\xbf").decode("latin-1")
    tabs = has_suffix(path, (".tsv", ".tsv.gz"))
    delimiter = _sniff_delimiter(header, default="\t" if tabs else ",")
    try:
        # Decoding the whole file once is cheap and, unlike the parser, gives the true offset.
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _encoding_error(file, data, err, header.split(delimiter), delimiter) from err
    if "\x00" in header:  # UTF-16 without a byte-order mark: ASCII, a NUL byte beside each
        raise DataValidationError(
            f"has NUL bytes in its header (byte offset {data.index(0)})", file=file,
            allowed=reencoding_advice(data),
        )  # fmt: skip
    names = [name.strip() for name in next(csv.reader([header.rstrip("\r")], delimiter=delimiter))]
    # the parser would rename one of two equal names and keep going (empty names, as trailing
    # delimiters make, are columns nobody reads)
    repeated = next((name for name in names if name and names.count(name) > 1), None)
    if repeated is not None:
        raise DataValidationError(
            f"is named {names.count(repeated)} times in the header",
            file=file,
            column=repeated,
            allowed="each column named once",
        )
    # An id is text: "NA", "null" or "None" name a user or an item like any other word. Only an
    # empty field is a missing id; the other columns keep pandas' words for a missing value.
    header_names = next(
        csv.reader([header.rstrip("\r").removeprefix("\ufeff")], delimiter=delimiter)
    )
    id_names = [name for name in header_names if name.strip() in id_cols]
    try:
        raw = pd.read_csv(
            io.BytesIO(data),
            sep=delimiter,
            dtype=dict.fromkeys(id_names, str),
            encoding="utf-8-sig",
            keep_default_na=False,
            na_values={name: [""] if name in id_names else _MISSING_WORDS for name in header_names},
        )
    except pd.errors.EmptyDataError as err:
        raise DataValidationError("is empty", file=file, allowed="a header and data rows") from err
    except (pd.errors.ParserError, ValueError) as err:
        raise parse_error(file, err, header_lines=1) from err
    # "user_id, item_id" headers are common; a stray space should not make a column vanish.
    raw.columns = [str(name).strip() for name in raw.columns]
    return raw


def line_of_row(path: Path, row: int) -> int | None:
    """The line of a delimited file where data row ``row`` (1-based, after the header) starts,
    counting blank lines, which the reader skips, and quoted line breaks; None when the file
    cannot be read again the same way. Read only for an error, so it costs nothing otherwise."""
    found = locate_row(path, row)
    return None if found is None else found[0]


def locate_row(path: Path, row: int) -> tuple[int, int, int] | None:
    """Where data row ``row`` is (:func:`line_of_row`): its line, its number of fields and the
    header's; None when the file cannot be read again the same way."""
    try:
        data = path.read_bytes()
        if has_suffix(path, (".gz",)):
            data = gzip.decompress(data)
        text = data.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError):
        return None
    header = text.split("\n", 1)[0]
    tabs = has_suffix(path, (".tsv", ".tsv.gz"))
    reader = csv.reader(
        io.StringIO(text), delimiter=_sniff_delimiter(header, default="\t" if tabs else ",")
    )
    ended, records, width = 0, -1, 0  # the header is record 0
    try:
        for record in reader:
            start, ended = ended + 1, reader.line_num
            if len(record) <= 1 and not "".join(record).strip():
                continue  # a blank or whitespace-only line: no row (delimiters alone make one)
            records += 1
            if records == 0:
                width = len(record)
            if records == row:
                return start, len(record), width
    except csv.Error:
        return None
    return None


def _sniff_delimiter(header: str, *, default: str) -> str:
    counts = {delimiter: header.count(delimiter) for delimiter in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda delimiter: counts[delimiter])
    return best if counts[best] > 0 else default


def _encoding_error(
    file: str, data: bytes, err: UnicodeDecodeError, header: list[str], delimiter: str
) -> DataValidationError:
    offset = err.start
    line_start = data.rfind(b"\n", 0, offset) + 1
    line = data.count(b"\n", 0, offset) + 1
    field = data[line_start:offset].count(delimiter.encode())
    column = header[field].strip() if line > 1 and field < len(header) else None
    return DataValidationError(
        f"byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) is not valid UTF-8",
        file=file,
        row=line - 1 if line > 1 else None,
        column=column,
        allowed=reencoding_advice(data),
    )


def integer_ids(ids: pd.Series) -> pd.Series:
    """Ids read as text, with canonical integer ids given back their int64 type (all of them
    canonical integers within int64's range; otherwise the text stays)."""
    if not pd.api.types.is_string_dtype(ids.dtype):
        return ids
    if ids.str.fullmatch(_CANONICAL_INT).all():
        try:
            return ids.astype(np.int64)
        except OverflowError:  # 19 digits beyond int64's range: text, as longer ids are
            return ids
    return ids
